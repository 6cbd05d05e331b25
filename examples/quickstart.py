"""Quickstart: one LoRA round trip — train, publish, sample from exactly those weights.

It follows the Loops minimal example: provision a trainer, run forward/backward on one masked
prompt/answer pair, step Adam, publish, and sample. On the default ``local`` backend with the
built-in ``loops/tiny-qwen3`` (a tiny random-initialised Qwen3 generated on first use, nothing
downloaded) it runs on a laptop CPU in well under a minute::

    python examples/quickstart.py                                  # local backend, tiny model
    LOOPS_BACKEND=fake python examples/quickstart.py               # deterministic numpy fake
    python examples/quickstart.py --model Qwen/Qwen3-0.6B          # a real model (GPU advised)
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from loops_core import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient, TensorData

TINY = "loops/tiny-qwen3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: 5e-3 for the tiny model, 5e-4 otherwise")
    args = parser.parse_args()
    lr = args.lr or (5e-3 if args.model == TINY else 5e-4)
    start = time.perf_counter()

    with ServiceClient() as service_client:
        print(f"backend: {service_client.backend_name}; provisioning a trainer for {args.model} ...", flush=True)
        training_client = service_client.create_lora_training_client(base_model=args.model, rank=args.rank, seed=0)

        # Tokenize one prompt/answer pair. Position i of the input predicts token i + 1, so the
        # input is tokens[:-1] and the targets are tokens[1:], with the prompt positions masked.
        tokenizer = training_client.get_tokenizer()
        prompt = tokenizer.encode("What is the capital of France?\nAnswer:", add_special_tokens=False)
        answer = tokenizer.encode(" Paris", add_special_tokens=False) + [tokenizer.eos_token_id]
        tokens = prompt + answer
        targets = ([-100] * len(prompt) + answer)[1:]
        datum = Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])},
        )

        losses = []
        for _ in (bar := tqdm(range(args.steps), desc="training", unit="step")):
            out = training_client.forward_backward(data=[datum]).result(timeout=600.0)
            training_client.optim_step(AdamParams(learning_rate=lr)).result(timeout=600.0)
            losses.append(out.loss)
            bar.set_postfix(loss=f"{out.loss:.4f}")
        marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
        print("loss: " + "  ".join(f"step {i}: {losses[i]:.4f}" for i in marks))

        sampling_client = training_client.save_weights_and_get_sampling_client(name="quickstart").result(timeout=600.0)
        result = sampling_client.sample(
            prompt=ModelInput.from_ints(prompt), num_samples=1, sampling_params=SamplingParams(max_tokens=16, seed=0),
        )
        seq = result.sequences[0]
        text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
        print(f"sampled (policy version {result.policy_version}): {seq.tokens} -> {text!r}")
        print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
