# The Loops SDK reference's minimal example, verbatim but for the import line
# (`from baseten.loops import ...` -> `from loops_core import ...`).
# Run it on the fake backend: LOOPS_BACKEND=fake python examples/seed_minimal.py
from loops_core import (
    ServiceClient, Datum, ModelInput, TensorData, AdamParams, SamplingParams,
)

service_client = ServiceClient()
training_client = service_client.create_lora_training_client(
    base_model="Qwen/Qwen3.5-2B", rank=16,
)

# Tokenize one prompt/answer pair and mask the prompt positions from the loss.
tokenizer = training_client.get_tokenizer()
prompt = tokenizer.encode("What is the capital of France?\nAnswer:", add_special_tokens=False)
answer = tokenizer.encode(" Paris", add_special_tokens=False)
tokens = prompt + answer
targets = [-100] * len(prompt) + answer

datum = Datum(
    model_input=ModelInput.from_ints(tokens),
    loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])},
)

training_client.forward_backward(data=[datum]).result(timeout=600.0)
training_client.optim_step(AdamParams(learning_rate=4e-5)).result(timeout=600.0)
sampling_client = training_client.save_weights_and_get_sampling_client(name="step-1").result(timeout=600.0)

result = sampling_client.sample(
    prompt=ModelInput.from_ints(prompt), num_samples=1, sampling_params=SamplingParams(max_tokens=16),
)
print(result.sequences[0].tokens)
