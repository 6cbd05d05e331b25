"""Drive loops' servers with the published baseten-loops client (run under its own Python >= 3.12).

Usage: python drive_loops_servers.py TRAINER_URL SAMPLER_URL   (servers: loops serve --engine fake)
"""
import sys
from baseten.loops import ServiceClient, Datum, ModelInput, TensorData, AdamParams, SamplingParams
trainer_url, sampler_url = sys.argv[1], sys.argv[2]
sc = ServiceClient.local(trainer_url=trainer_url, sampler_url=sampler_url)
tc = sc.create_lora_training_client(base_model="fake-model", rank=8)
prompt = list(b"What is the capital of France?\nAnswer:")
answer = list(b" Paris")
tokens = prompt + answer
targets = ([-100] * len(prompt) + answer)[1:]
datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])})
for i in range(30):
    out = tc.forward_backward(data=[datum]).result(timeout=60)
    tc.optim_step(AdamParams(learning_rate=5e-2)).result(timeout=60)
print("loss", out.loss, out.metrics)
fwd = tc.forward(data=[datum]).result(timeout=60)
print("forward ok", len(fwd.loss_fn_outputs))
try:
    print("policy_version", tc.policy_version)
except Exception as e: print("policy_version err", type(e).__name__, e)
try:
    s = tc.save_weights_and_get_sampling_client(name="pub")
    print("save+sample client", s)
except Exception as e:
    print("save_weights_and_get_sampling_client:", type(e).__name__, str(e)[:200])
    s = None
samp = s or sc.create_sampling_client(base_model="fake-model")
r = samp.sample(prompt=ModelInput.from_ints(prompt), num_samples=2, sampling_params=SamplingParams(max_tokens=8, temperature=0.0), include_prompt_logprobs=True, topk_prompt_logprobs=2)
print("sample", [bytes(x.tokens) for x in r.sequences], r.policy_version, r.prompt_logprobs[:3], r.topk_prompt_logprobs[:2] if r.topk_prompt_logprobs else None)
print("logprobs", samp.compute_logprobs(ModelInput.from_ints(prompt))[:3])
print("base", samp.discover_base_model_name(), "adapter", samp.discover_adapter_name())
