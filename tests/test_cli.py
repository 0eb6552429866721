"""cli.parse_layered: layer order, required fields from a layer, ignored keys, defaults in --help."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from antisd.cli import parse_layered


@dataclass
class Toy:
    name: str = field(metadata={"help": "required unless a layer gives it"})
    config: str | None = None
    steps: int = 1
    rate: float = field(default=0.5, metadata={"help": "with help text"})
    resume: bool = False


def test_layers_lowest_first(tmp_path):
    recipe, saved = tmp_path / "recipe.yaml", tmp_path / "saved.yaml"
    recipe.write_text("name: recipe\nsteps: 2\nrate: 0.1\nresume: true\n")
    saved.write_text("steps: 3\nconfig: other.yaml\n")
    base = [{"name": "base", "steps": 9, "rate": 0.9}]
    assert parse_layered(Toy, [], base_layers=base) == Toy(name="base", steps=9, rate=0.9)
    cfg = parse_layered(Toy, ["--config", str(recipe)], base_layers=base, override_files=[saved],
                        ignored_keys=("config", "resume"))
    assert cfg == Toy(name="recipe", config=str(recipe), steps=3, rate=0.1, resume=False)
    cfg = parse_layered(Toy, ["--config", str(recipe), "--steps", "4", "--name", "cli"], override_files=[saved])
    assert (cfg.name, cfg.steps, cfg.resume) == ("cli", 4, True)
    with pytest.raises(SystemExit) as exc:
        parse_layered(Toy, [])  # --name is required when no layer gives it
    assert exc.value.code == 2
    saved.write_text("stepz: 3\n")
    with pytest.raises(SystemExit, match=r"saved\.yaml: unknown config keys \['stepz'\]"):
        parse_layered(Toy, ["--name", "x"], override_files=[saved])


def test_help_shows_description_and_defaults_without_help_text(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_layered(Toy, ["--help"], "Toy.\n\n    indented as written\n", base_layers=[{"steps": 7}])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Toy.\n\n    indented as written\n" in out
    text = " ".join(out.split("options:")[1].split())
    assert "--steps STEPS (default: 7)" in text and "with help text (default: 0.5)" in text
    assert "--resume [RESUME] (default: False)" in text


def test_a_yaml_file_includes_its_shared_setup(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text("name: base\nsteps: 5\nrate: 0.2\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("include: shared/base.yaml\nsteps: 6\n")
    assert parse_layered(Toy, ["--config", str(recipe)]) == Toy(name="base", config=str(recipe), steps=6, rate=0.2)
    assert parse_layered(Toy, ["--config", str(recipe), "--rate", "0.3"]).rate == 0.3
    (tmp_path / "shared" / "base.yaml").write_text("include: ../recipe.yaml\n")
    with pytest.raises(SystemExit, match="includes itself"):
        parse_layered(Toy, ["--config", str(recipe)])
    recipe.write_text("include: missing.yaml\n")
    with pytest.raises(SystemExit, match=r"missing\.yaml: no such config file \(included by"):
        parse_layered(Toy, ["--config", str(recipe)])
