"""One rollout interface for training and evaluation, two backends behind it.

    rollouts.generate(prompt_ids, SamplingSettings(...), seed) -> generation.Samples
    rollouts.load_weights(model)   # the policy's current weights into the sampler (after each update)
    rollouts.wake() / rollouts.sleep()   # around generate: the sampler's GPU memory back / freed

- `TransformersRollouts`: the trained model samples itself with transformers `generate`
  (`generation.sample`; an FSDP2 model from weights gathered once per call). Its hooks do nothing
  and `Samples.sampler_logprobs` is None: the sampler is the trainer.
- `VLLMRollouts`: a vLLM engine. Colocated for training (one engine per training process on its
  own GPU, tensor-parallel 1, TRL GRPOTrainer's colocate mode): sleep mode level 2 frees weights and
  KV cache during teacher scoring and the update, and the trained weights are pushed one parameter
  at a time. It returns vLLM's log-prob of each sampled token, for the trainer's truncated importance
  sampling. The vLLM calls it makes (and nothing else) are listed in the README, "Rollout backends".

Both return the sampled token ids as the sampler produced them, cut after the first EOS (text is
decoded for the reward only, never re-tokenized), `truncated` when no EOS came within
`max_new_tokens`, and texts decoded the same way.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from typing import Protocol

import torch

from antisd.distributed import full_parameters, full_weights_for_generation
from antisd.generation import DEFAULT_DECODING, Samples, eos_token_ids, sample

ROLLOUT_BACKENDS = ("transformers", "vllm")
VLLM_VERSIONS = "==0.25.1"  # requirements-vllm.txt: the version whose source these calls were checked against


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0


class RolloutBackend(Protocol):
    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, seed: int) -> Samples:
        """One completion per entry of `prompt_ids` (repeat a prompt G times for a group), in order;
        the same `seed` gives the same samples."""

    def load_weights(self, model) -> None:
        """Make the sampler sample from `model`'s current weights."""

    def wake(self) -> None:
        """Before generate: the sampler's memory back."""

    def sleep(self) -> None:
        """After generate: the sampler's memory freed for scoring and the update."""


def generate_for_step(rollouts: RolloutBackend, model, prompt_ids: list[list[int]], settings: SamplingSettings,
                      seed: int) -> Samples:
    """One training step's rollouts: the policy's latest weights pushed into the sampler (vLLM), which is
    woken to generate and put back to sleep, freeing its memory for teacher scoring and the update."""
    rollouts.load_weights(model)
    rollouts.wake()
    samples = rollouts.generate(prompt_ids, settings, seed=seed)
    rollouts.sleep()
    return samples


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one process's rollouts of one step: runs, steps and processes sample apart."""
    return seed * 1_000_003 + step * 1009 + rank


def cut_at_eos(token_ids: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS, truncated = no EOS)."""
    for i, tok in enumerate(token_ids):
        if tok in eos_ids:
            return list(token_ids[: i + 1]), False
    return list(token_ids), True


class TransformersRollouts:
    """The trained model samples itself (`generation.sample`): at most `batch_size` sequences and
    `max_batch_tokens` KV-cache tokens per `generate` call, decoded as `decoding` says
    (`generation.DECODINGS`; `generate` is transformers' own loop)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, max_batch_tokens: int | None = None,
                 progress: bool = False, decoding: str = DEFAULT_DECODING):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.batch_size, self.max_batch_tokens, self.progress = batch_size, max_batch_tokens, progress

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, seed: int) -> Samples:
        torch.manual_seed(seed)
        with full_weights_for_generation(self.model):  # FSDP2: shards gathered once, freed before the update
            return sample(self.model, self.tokenizer, prompt_ids, max_new_tokens=settings.max_new_tokens,
                          temperature=settings.temperature, top_p=settings.top_p, batch_size=self.batch_size,
                          max_batch_tokens=self.max_batch_tokens, progress=self.progress, decoding=self.decoding)

    def load_weights(self, model) -> None:  # it samples from the trained model itself
        pass

    def wake(self) -> None:
        pass

    def sleep(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"--rollout_backend vllm needs the `vllm` package, which is not installed: "
                          f"pip install -r requirements-vllm.txt (vllm{VLLM_VERSIONS}, CUDA GPUs only)") from error
    return vllm


class VLLMRollouts:
    """A vLLM engine started once from `model_path` in `dtype`.

    `colocate=True` (training): one engine in this training process (`external_launcher`, tensor
    parallel 1, the process's rank read from the launcher's environment) with sleep mode; it
    starts asleep, so call `load_weights` before the first `generate`. Otherwise (evaluation) an
    ordinary engine over `tensor_parallel_size` GPUs whose hooks are not used.
    """

    def __init__(self, model_path: str, tokenizer, eos_ids: list[int], *, dtype: str, gpu_memory_utilization: float,
                 max_model_len: int | None, seed: int, colocate: bool, tensor_parallel_size: int = 1):
        vllm = import_vllm()
        self.vllm, self.tokenizer, self.eos_ids, self.colocate = vllm, tokenizer, eos_ids, colocate
        options = {}
        if colocate:
            for name, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                                  ("MASTER_PORT", str(free_port()))):
                os.environ.setdefault(name, default)  # set by accelerate/torchrun; a plain `python` run is rank 0 of 1
            options = {"enable_sleep_mode": True, "distributed_executor_backend": "external_launcher"}
        self.llm = vllm.LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, tensor_parallel_size=tensor_parallel_size,
                            # the trainer scores log_softmax(logits / T): vLLM's log-probs after its temperature (top-p < 1
                            # also renormalizes over the nucleus, as in TRL)
                            logprobs_mode="processed_logprobs", **options)
        if colocate:
            self.llm.sleep(level=2)  # level 2 discards the weights: load_weights pushes them before each rollout

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, seed: int) -> Samples:
        rng = random.Random(seed)  # one seed per request: a rollout does not depend on its batch neighbours
        greedy = settings.temperature <= 0
        params = [self.vllm.SamplingParams(n=1, temperature=max(settings.temperature, 0.0),
                                           top_p=1.0 if greedy else settings.top_p, max_tokens=settings.max_new_tokens,
                                           logprobs=0, seed=rng.getrandbits(31), stop_token_ids=self.eos_ids,
                                           detokenize=False)
                  for _ in prompt_ids]
        prompts = [self.vllm.TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        completions, truncated, logprobs = [], [], []
        for out in outputs:
            done = out.outputs[0]
            ids, cut = cut_at_eos(list(done.token_ids), self.eos_ids)
            completions.append(ids)
            truncated.append(cut)
            logprobs.append([done.logprobs[i][tok].logprob for i, tok in enumerate(ids)])  # logprobs=0: the sampled token's
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Samples([list(p) for p in prompt_ids], completions, truncated, texts, logprobs)

    def load_weights(self, model) -> None:
        """Push `model`'s parameters into the engine one full tensor at a time (FSDP2: gathered one by
        one, never the whole model twice on a GPU); every process calls it (the gathers are collective)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's cached blocks back to the driver, for vLLM to map its weights into
        self.llm.wake_up(tags=["weights"])
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in full_parameters(model):
            engine_model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def wake(self) -> None:
        if self.colocate:
            self.llm.wake_up(tags=["kv_cache"])

    def sleep(self) -> None:
        if self.colocate:
            self.llm.sleep(level=2)


def make_rollouts(backend: str, model, tokenizer, decoding: str, batch_size: int, max_batch_tokens: int | None,
                  dtype: torch.dtype, seed: int, vllm_gpu_memory_utilization: float, max_model_len: int) -> RolloutBackend:
    """The training loop's backend: `model` samples itself (`decoding`, `batch_size` sequences and
    `max_batch_tokens` per generate call), or a colocated vLLM engine started from the model's path."""
    if backend == "transformers":
        return TransformersRollouts(model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                    decoding=decoding)
    if backend == "vllm":
        return VLLMRollouts(model.name_or_path, tokenizer, eos_token_ids(model.generation_config, tokenizer),
                            dtype=str(dtype).removeprefix("torch."), gpu_memory_utilization=vllm_gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, colocate=True)
    raise ValueError(f"unknown rollout backend {backend!r}; choose from {ROLLOUT_BACKENDS}")
