"""Supervised fine-tuning written against the Tinker SDK (sync style: every call returns a future,
``.result()`` waits), run by loops' ``tinker`` shim.

Nothing here names loops: the backend comes from ``LOOPS_BACKEND``::

    LOOPS_BACKEND=fake  python examples/tinker/sl_loop.py    # in-process numpy model, seconds
    LOOPS_BACKEND=local python examples/tinker/sl_loop.py    # built-in loops/tiny-qwen3, CPU or GPU

It trains on three prompt/answer pairs (prompt tokens weighted 0), saves a training checkpoint and
a sampler checkpoint, samples from the sampler checkpoint, resumes a new run from the training
checkpoint, and reads the run's ``user_metadata`` back through the REST client.
"""

from __future__ import annotations

import os

import tinker
from tinker import types

BASE_MODEL = os.environ.get("TINKER_EXAMPLE_MODEL", "loops/tiny-qwen3")
STEPS = int(os.environ.get("TINKER_EXAMPLE_STEPS", "15"))
LEARNING_RATE = float(os.environ.get("TINKER_EXAMPLE_LR", "2e-2"))
PAIRS = [("The capital of France is", " Paris."), ("The capital of Italy is", " Rome."),
         ("The capital of Spain is", " Madrid.")]


def make_datum(tokenizer, prompt: str, completion: str) -> types.Datum:
    """Input: the sequence minus its last token; targets: minus its first; only the completion counts."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False)
    tokens, weights = p + c, [0.0] * len(p) + [1.0] * len(c)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]})


def main() -> None:
    service_client = tinker.ServiceClient()
    training_client = service_client.create_lora_training_client(
        base_model=BASE_MODEL, rank=8, seed=0, user_metadata={"recipe": "sl_loop"}).result()
    print(f"run {training_client.model_id} on {BASE_MODEL}")
    tokenizer = training_client.get_tokenizer()
    batch = [make_datum(tokenizer, p, c) for p, c in PAIRS]
    n_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
    adam = types.AdamParams(learning_rate=LEARNING_RATE)

    first = last = None
    for step in range(STEPS):
        fwd_bwd = training_client.forward_backward(batch, loss_fn="cross_entropy")
        optim = training_client.optim_step(adam)  # queued right behind forward_backward
        out = fwd_bwd.result()
        optim.result()
        nll = out.metrics["loss:sum"] / n_tokens
        # The per-token logprobs come back too: the weighted sum of -logprobs is the loss.
        check = -sum(w * lp for d, o in zip(batch, out.loss_fn_outputs)
                     for w, lp in zip(d.loss_fn_inputs["weights"].data, o["logprobs"].tolist()) if w)
        assert abs(check - out.metrics["loss:sum"]) < 1e-3 * max(1.0, abs(check)), (check, out.metrics)
        first = nll if first is None else first
        last = nll
        print(f"step {step:2d}  nll/token {nll:.4f}")

    state = training_client.save_state("final").result()
    sampler_checkpoint = training_client.save_weights_for_sampler("final").result()
    print(f"saved state   {state.path}")
    print(f"saved sampler {sampler_checkpoint.path}")

    sampling_client = service_client.create_sampling_client(model_path=sampler_checkpoint.path).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(PAIRS[0][0], add_special_tokens=False))
    result = sampling_client.sample(prompt=prompt, num_samples=1,
                                    sampling_params=types.SamplingParams(max_tokens=6, temperature=0.0)).result()
    sequence = result.sequences[0]
    assert sequence.sequence_id and len(sequence.logprobs) == len(sequence.tokens)
    print(f"sample        {tokenizer.decode(sequence.tokens)!r} ({sequence.stop_reason})")
    # The sampler serves the trained weights: it scores the first pair as the trainer does.
    tokens = batch[0].model_input.to_ints() + batch[0].loss_fn_inputs["target_tokens"].tolist()[-1:]
    full = types.ModelInput.from_ints(tokens)
    sampler_lp = sampling_client.compute_logprobs(full).result()[1:]
    trainer_lp = training_client.forward(batch[:1], loss_fn="cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    gap = max(abs(a - b) for a, b in zip(sampler_lp, trainer_lp.tolist()))
    print(f"max |trainer - sampler logprob| {gap:.1e}")

    resumed = service_client.create_training_client_from_state_with_optimizer(state.path).result()
    resumed_nll = resumed.forward(batch, loss_fn="cross_entropy").result().metrics["loss:sum"] / n_tokens
    print(f"resumed run {resumed.model_id}: nll/token {resumed_nll:.4f}")

    run = tinker.RestClient().get_training_run_by_tinker_path(state.path).result()
    print(f"user_metadata {run.user_metadata}")
    print(f"nll/token first {first:.4f} last {last:.4f}")
    service_client.close("success").result()


if __name__ == "__main__":
    main()
