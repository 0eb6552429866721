"""A stand-in for the `vllm` package on CPU: exactly the calls rollouts.VLLMRollouts makes, and no more.

    vllm.LLM(model=..., dtype=..., gpu_memory_utilization=..., max_model_len=..., seed=..., tensor_parallel_size=...,
             logprobs_mode=..., [enable_sleep_mode=True, distributed_executor_backend="external_launcher"])
    vllm.SamplingParams(n, temperature, top_p, max_tokens, logprobs, seed, stop_token_ids, detokenize)
    vllm.TokensPrompt(prompt_token_ids=...)
    llm.generate(prompts, sampling_params=[...], use_tqdm=False) -> [RequestOutput(outputs=[CompletionOutput])]
        CompletionOutput: token_ids, logprobs (one {token_id: Logprob(logprob)} per token), finish_reason
    llm.sleep(level=2), llm.wake_up(tags=["weights"] | ["kv_cache"]), llm.reset_prefix_cache()
    llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])

The engine is a real copy of the model (loaded from the path like vLLM's) that samples token by
token with a torch.Generator per request seed. It enforces the sleep contract (no generate while
asleep, no weight load while the weights sleep) and records every call in `events`, every push
in `pushes`, every request in `requests` and the token ids it returned in `returned`. `logprob_shift(position)` is added to the log-prob
it reports, to play a sampler whose numerics differ from the trainer's.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field

import torch

events: list[tuple] = []  # (call, detail) in order, shared with the test's own markers
engines: list = []


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    logprobs: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    detokenize: bool = True


def TokensPrompt(prompt_token_ids: list[int]) -> dict:  # a TypedDict in vLLM
    return {"prompt_token_ids": prompt_token_ids}


class EngineModel:
    """What vLLM's model runner holds: `load_weights` of (HF name, tensor) pairs."""

    def __init__(self, llm, hf_model):
        self.llm, self.hf_model = llm, hf_model

    def load_weights(self, weights) -> None:
        assert self.llm.awake["weights"], "load_weights while the weights sleep"
        params = dict(self.hf_model.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)  # an unknown name is a KeyError, as vLLM's loader fails
            self.llm.pushes[-1][name] = tensor.detach().clone()
        events.append(("load_weights", len(weights)))


class LLM:
    logprob_shift = staticmethod(lambda position: 0.0)

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = {"model": model, **kwargs}
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[kwargs["dtype"]]
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
        runner = types.SimpleNamespace(model=EngineModel(self, hf_model))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))
        self.awake = {"weights": True, "kv_cache": True}
        self.pushes, self.requests, self.returned = [], [], []
        engines.append(self)

    def sleep(self, level: int = 1) -> None:
        assert self.kwargs.get("enable_sleep_mode") and level == 2
        self.awake = {"weights": False, "kv_cache": False}
        events.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        for tag in tags or list(self.awake):
            self.awake[tag] = True
        if tags == ["weights"]:
            self.pushes.append({})
        events.append(("wake_up", tuple(tags or ())))

    def reset_prefix_cache(self) -> None:
        events.append(("reset_prefix_cache", None))

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm: bool = True):
        assert all(self.awake.values()), f"generate while asleep: {self.awake}"
        model = self.llm_engine.model_executor.driver_worker.model_runner.model.hf_model
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            assert params.n == 1 and params.logprobs == 0 and not params.detokenize
            self.requests.append(params)
            generator = torch.Generator().manual_seed(params.seed)
            ids, token_ids, logprobs = list(prompt["prompt_token_ids"]), [], []
            for position in range(params.max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                assert self.kwargs["logprobs_mode"] == "processed_logprobs"  # after the temperature, as the trainer scores
                logp = torch.log_softmax(logits / params.temperature, dim=-1)
                token = int(torch.multinomial(torch.softmax(logits / params.temperature, dim=-1), 1, generator=generator))
                ids.append(token)
                token_ids.append(token)
                logprobs.append({token: types.SimpleNamespace(logprob=logp[token].item() + self.logprob_shift(position))})
                if token in params.stop_token_ids:
                    break
            self.returned.append(token_ids)
            finish = "stop" if token_ids[-1] in params.stop_token_ids else "length"
            outputs.append(types.SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[
                types.SimpleNamespace(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)]))
        events.append(("generate", len(prompts)))
        return outputs


def install(monkeypatch) -> types.ModuleType:
    """Put this stand-in where `import vllm` finds it, with empty records."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # what importlib.util.find_spec("vllm") reads
    module.LLM, module.SamplingParams, module.TokensPrompt = LLM, SamplingParams, TokensPrompt
    events.clear()
    engines.clear()
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module
