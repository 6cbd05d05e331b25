"""GRPO-style reinforcement learning written against the Tinker SDK (async style: ``await`` every
future, ``asyncio.gather`` the concurrent ones), run by loops' ``tinker`` shim.

Each step publishes the current weights to a sampling client, samples a group of completions per
prompt, rewards each completion by the share of vowels in its text, turns rewards into
group-relative advantages, and trains with an RL loss on the sampler's logprobs::

    LOOPS_BACKEND=fake  python examples/tinker/rl_loop.py                     # importance_sampling
    LOOPS_BACKEND=local python examples/tinker/rl_loop.py ppo                 # or gspo, cispo,
    LOOPS_BACKEND=fake  python examples/tinker/rl_loop.py stable_reinforce    # stable_reinforce
"""

from __future__ import annotations

import asyncio
import os
import sys

import tinker
from tinker import types

BASE_MODEL = os.environ.get("TINKER_EXAMPLE_MODEL", "loops/tiny-qwen3")
STEPS = int(os.environ.get("TINKER_EXAMPLE_STEPS", "12"))
LEARNING_RATE = float(os.environ.get("TINKER_EXAMPLE_LR", "5e-2"))
GROUP_SIZE, MAX_TOKENS = 8, 8
PROMPTS = ["Once upon a time", "The weather today", "My favourite word is"]
VOWELS = os.environ.get("TINKER_EXAMPLE_REWARDED", "aeiou")


def reward(text: str) -> float:
    return sum(ch in VOWELS for ch in text) / max(len(text), 1)


def make_datum(loss_fn: str, prompt: list[int], seq: types.SampledSequence, advantage: float) -> types.Datum:
    """Prompt + completion, shifted by one. Prompt positions get logprob 0 and advantage 0."""
    tokens, n_prompt, n_sampled = prompt + seq.tokens, len(prompt), len(seq.tokens)
    inputs = {"target_tokens": tokens[1:],
              "logprobs": [0.0] * (n_prompt - 1) + list(seq.logprobs),
              "advantages": [0.0] * (n_prompt - 1) + [advantage] * n_sampled}
    if loss_fn == "gspo":  # the sequence ratio covers the sampled tokens only
        inputs["sequence_ratio_mask"] = [0.0] * (n_prompt - 1) + [1.0] * n_sampled
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
    if loss_fn == "stable_reinforce":  # name where every position came from
        sid = seq.sequence_id
        datum = datum.with_provenance(
            model_input=[types.PromptProvenanceSpan(sequence_id=sid, length=n_prompt),
                         types.SampledProvenanceSpan(sequence_id=sid, length=n_sampled - 1)],
            loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n_prompt - 1),
                            types.SampledProvenanceSpan(sequence_id=sid, length=n_sampled)])
    return datum


async def main(loss_fn: str) -> None:
    service_client = tinker.ServiceClient()
    training_client = await service_client.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0)
    tokenizer = training_client.get_tokenizer()
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0)
    print(f"run {training_client.model_id} on {BASE_MODEL}, loss {loss_fn}")

    rewards_per_step = []
    for step in range(STEPS):
        sampling_client = await training_client.save_weights_and_get_sampling_client(record_stability_info=True)
        results = await asyncio.gather(*[
            sampling_client.sample(prompt=types.ModelInput.from_ints(p), num_samples=GROUP_SIZE, sampling_params=params)
            for p in prompts])
        datums, rewards = [], []
        for prompt, result in zip(prompts, results):
            group = [(seq, reward(tokenizer.decode(seq.tokens))) for seq in result.sequences if seq.tokens]
            mean = sum(r for _, r in group) / len(group)
            rewards += [r for _, r in group]
            datums += [make_datum(loss_fn, prompt, seq, r - mean) for seq, r in group if r != mean]
        fwd_bwd = training_client.forward_backward(datums, loss_fn)
        optim = training_client.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))
        out, _ = await asyncio.gather(fwd_bwd, optim)
        rewards_per_step.append(sum(rewards) / len(rewards))
        # The trainer scored the sampled tokens with the weights they were sampled from.
        gap = max((abs(lp - q) for d, o in zip(datums, out.loss_fn_outputs)
                   for lp, q, a in zip(o["logprobs"].tolist(), d.loss_fn_inputs["logprobs"].tolist(),
                                       d.loss_fn_inputs["advantages"].tolist()) if a), default=0.0)
        print(f"step {step:2d}  reward {rewards_per_step[-1]:.3f}  loss {out.metrics['loss:sum']:+.4f}  "
              f"datums {len(datums):2d}  max |trainer - sampler logprob| {gap:.1e}")

    # compute_logprobs scores a sampled completion as the sampler sampled it (temperature 1).
    sampling_client = await training_client.save_weights_and_get_sampling_client()
    sample = await sampling_client.sample(prompt=types.ModelInput.from_ints(prompts[0]), num_samples=1,
                                          sampling_params=params)
    seq = sample.sequences[0]
    scored = await sampling_client.compute_logprobs(types.ModelInput.from_ints(prompts[0] + seq.tokens))
    gap = max(abs(a - b) for a, b in zip(scored[len(prompts[0]):], seq.logprobs))
    print(f"sample {tokenizer.decode(seq.tokens)!r}; compute_logprobs vs sampled logprobs: {gap:.1e}")
    k = max(1, STEPS // 3)
    print(f"reward first {sum(rewards_per_step[:k]) / k:.3f} last {sum(rewards_per_step[-k:]) / k:.3f}")
    await service_client.close("success")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "importance_sampling"))
