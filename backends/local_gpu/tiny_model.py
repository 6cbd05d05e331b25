"""``loops/tiny-qwen3``: a tiny Qwen3-architecture causal LM, generated locally, offline.

Nothing is downloaded. On first use :func:`tiny_model_path` builds, in a few seconds:

* a byte-level BPE tokenizer trained with ``tokenizers`` on a deterministic English corpus written
  out below (capital-city Q/A, facts, arithmetic, code and chat turns), saved as a
  ``PreTrainedTokenizerFast`` with a Qwen-style ChatML chat template. Special tokens:
  ``<|endoftext|>`` (eos and pad), ``<|im_start|>``, ``<|im_end|>``;
* a ``Qwen3ForCausalLM`` (a few million parameters, tied embeddings like the small Qwen3s) with
  weights drawn from ``torch.manual_seed(0)``, saved as fp32 safetensors.

The directory loads like any hub model: ``AutoModelForCausalLM.from_pretrained(tiny_model_path())``
and ``AutoTokenizer.from_pretrained(tiny_model_path())``. Its weights are random: it only learns
what you train into it, which makes it a good fixture (and the quickstart's " Paris" demo).

The directory is ``$LOOPS_HOME/models/tiny-qwen3-v1`` (``LOOPS_HOME`` defaults to ``~/.loops``).
It is built in a temporary sibling directory and renamed into place, so a reader never sees a
half-written model and two processes racing to build it are both fine (the loser discards its copy).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "loops/tiny-qwen3"
_DIR_NAME = "tiny-qwen3-v2"  # bump the suffix whenever the generated files change

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]  # ids 0, 1, 2
VOCAB_SIZE = 2048  # BPE target; the corpus is varied enough to reach it exactly

# Qwen2.5/Qwen3-style ChatML, without the default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Model shape: 2.1M parameters (0.5M of them the 2048 x 256 tied embedding).
# Tiny on purpose: tests and the quickstart train it on a 2-core CPU in seconds.
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def loops_home() -> Path:
    """``$LOOPS_HOME`` (read now, not at import), else ``~/.loops``."""
    return Path(os.environ.get("LOOPS_HOME") or Path.home() / ".loops").expanduser()


def tiny_model_path() -> Path:
    """The tiny model's directory, generated on the first call and reused after."""
    final = loops_home() / "models" / _DIR_NAME
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DIR_NAME}-", dir=final.parent))
    try:
        build_tiny_model(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is meant to be shared
        try:
            os.rename(tmp, final)  # atomic on one filesystem; fails if another process won
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_model(directory: Path) -> None:
    """Write tokenizer and model files into ``directory`` (deterministic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, directory)

    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos = tokenizer.token_to_id(EOS_TOKEN)
    im_end = tokenizer.token_to_id(IM_END)
    config = Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=eos,  # Qwen has no BOS token; its configs name <|endoftext|>
        eos_token_id=eos,
        # No pad_token_id in the model config (as in Qwen3's own): it would make the embedding
        # zero-initialise row 0, and row 0 is also eos, which then could never be predicted.
        # The tokenizer and generation config still pad with <|endoftext|>.
        pad_token_id=None,
        architectures=["Qwen3ForCausalLM"],
        **MODEL_SHAPE,
    )
    # Seed on a forked RNG so building the model does not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            model = Qwen3ForCausalLM(config)
            # With the default std 0.02 the tied 256-wide embedding rows have norm ~0.3, so after the
            # final RMSNorm (norm 16) no logit can exceed ~5 and no token gets p > 0.1: nothing
            # could be learned to near-zero loss. Std 1/sqrt(hidden) gives unit-norm rows.
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0.0, config.hidden_size ** -0.5)
        finally:
            torch.set_default_dtype(prev)
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=[eos, im_end], pad_token_id=eos)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "LOOPS_TINY_MODEL.json").write_text(json.dumps(
        {"name": TINY_MODEL_NAME, "version": _DIR_NAME, "note": "random weights, generated locally"},
        indent=2) + "\n")


def build_tokenizer():
    """Train the byte-level BPE tokenizer on :func:`corpus` (a ``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def save_tokenizer(tok, directory: Path) -> None:
    """``tokenizer.json`` plus a hand-written ``tokenizer_config.json``.

    Written by hand rather than by ``save_pretrained`` so that the files name the portable
    ``PreTrainedTokenizerFast`` class and load in transformers 4.x (vLLM) as well as 5.x.
    """
    tok.save(str(directory / "tokenizer.json"))
    special = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
               "additional_special_tokens": [IM_START, IM_END]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_SHAPE["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------
# The corpus: plain lists and templates, so it is identical on every machine.
# --------------------------------------------------------------------------------------------

_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Mexico", "Mexico City"), ("Russia", "Moscow"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("the United Kingdom", "London"), ("the United States", "Washington"),
]

_FACTS = [
    "Water boils at 100 degrees Celsius at sea level.",
    "The Earth orbits the Sun once every year.",
    "A week has seven days and a day has twenty four hours.",
    "The largest ocean on Earth is the Pacific Ocean.",
    "Light travels faster than sound.",
    "Plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "The human heart has four chambers.",
    "Mount Everest is the highest mountain above sea level.",
    "The chemical symbol for gold is Au and for iron is Fe.",
    "A triangle has three sides and a square has four.",
    "The Moon is a natural satellite of the Earth.",
    "Honey bees live in colonies with a single queen.",
    "Python is a programming language that is easy to read.",
    "Machine learning models learn patterns from data.",
    "A neural network is trained with gradient descent.",
    "The quick brown fox jumps over the lazy dog.",
]

_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
_THINGS = ["apples", "books", "coins", "pencils", "cookies", "stamps", "marbles", "shells"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten"]

_CODE = [
    "def add(a, b):\n    return a + b\n",
    "def greet(name):\n    print(f\"Hello, {name}!\")\n",
    "for i in range(10):\n    total += i\n",
    "if x > 0:\n    return True\nelse:\n    return False\n",
    "import numpy as np\narray = np.zeros((3, 4))\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "with open(\"data.txt\") as f:\n    lines = f.readlines()\n",
    "result = [x * x for x in values if x % 2 == 0]\n",
    "{\"name\": \"loops\", \"version\": 1, \"tags\": [\"train\", \"sample\"]}\n",
    "function add(a, b) {\n  return a + b;\n}\n",
]

# Varied prose so that the BPE vocabulary reaches its target size.
_PROSE = """
Once upon a time, in a small village near the mountains, there lived an old baker who woke up
before sunrise every morning. He mixed flour, water, salt and yeast, shaped the dough into round
loaves and waited patiently while the oven warmed. Children walked past his window on their way to
school and waved; sometimes he handed them a warm roll wrapped in paper. In winter the snow piled
against the doors, the river froze, and travellers stopped at the inn to drink hot soup by the fire.
In summer the fields turned golden, farmers harvested wheat and barley, and the market square filled
with merchants selling cheese, cherries, carpets, copper pots, wooden toys and woollen blankets.

Scientists study the natural world by asking questions, forming hypotheses, designing experiments
and measuring the results carefully. A good experiment changes one variable at a time and keeps the
others constant. Physics describes motion, energy, electricity, magnetism and gravity; chemistry
explains how atoms bond into molecules; biology investigates cells, genes, evolution and ecosystems.
Astronomers observe distant galaxies, nebulae, comets and planets through powerful telescopes, while
geologists examine rocks, volcanoes, earthquakes and the slow movement of continental plates.

Computers store information as bits. A program is a sequence of instructions that a processor
executes. Programmers write functions, variables, loops, conditions, classes and modules; they test
their code, fix bugs, review changes and deploy software to servers. Databases keep records in
tables; networks send packets between machines; compilers translate source code into machine code.
Training a language model means predicting the next token, computing a loss, taking the gradient
with backpropagation and updating the weights with an optimizer such as Adam. Reinforcement learning
rewards good answers; a policy samples completions, a reward function scores them, and advantages
tell the learner which tokens to make more likely. Low rank adaptation trains small matrices while
the base weights stay frozen, which saves memory and makes checkpoints tiny.

History records empires and republics, kings and queens, revolutions, treaties, inventions and
discoveries. The printing press spread books across Europe; the steam engine powered factories,
railways and ships; the telephone, radio, television and internet connected people around the globe.
Music has rhythm, melody and harmony; painters use colour, light and shadow; poets choose words for
their sound as well as their meaning. Doctors diagnose illness, nurses care for patients, teachers
explain difficult ideas, engineers build bridges, architects design buildings and pilots fly planes.

Animals include elephants, giraffes, lions, tigers, zebras, wolves, foxes, rabbits, squirrels,
dolphins, whales, sharks, octopuses, penguins, eagles, owls, parrots, sparrows, butterflies, beetles,
spiders, frogs, turtles, snakes and crocodiles. Fruits include bananas, oranges, lemons, grapes,
strawberries, blueberries, peaches, pears, plums, mangoes, pineapples and watermelons. Vegetables
include carrots, potatoes, tomatoes, onions, garlic, peppers, cucumbers, spinach, broccoli and beans.
Colours include red, orange, yellow, green, blue, indigo, violet, purple, pink, brown, grey, black
and white. Months are January, February, March, April, May, June, July, August, September, October,
November and December; days are Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.

Please remember to answer politely, explain your reasoning step by step, and check your work. If you
are unsure, say so honestly. Good writing is clear, concise and correct. Thank you for reading!
"""


def corpus() -> list[str]:
    """The tokenizer's training text (about 135 KB), in a fixed order."""
    docs: list[str] = []
    for country, city in _CAPITALS:
        docs += [
            f"What is the capital of {country}?\nAnswer: {city}",
            f"Question: What is the capital of {country}?\nAnswer: {city}",
            f"The capital of {country} is {city}.",
            f"{city} is the capital city of {country}.",
            f"Q: Which city is the capital of {country}? A: {city}",
        ]
    for i, fact in enumerate(_FACTS):
        docs.append(fact)
        docs.append(f"Fact {i + 1}: {fact}")
    for a in range(11):
        for b in range(0, 11, 2):
            docs.append(f"What is {a} plus {b}?\nAnswer: {a + b}")
            docs.append(f"{_NUMBER_WORDS[a]} times {_NUMBER_WORDS[min(b, 10)]} is {a * b}.")
    for i, name in enumerate(_NAMES):
        for j, thing in enumerate(_THINGS):
            n = (i * 3 + j * 5) % 9 + 2
            docs.append(f"{name} has {n} {thing}. {name} gives one away and now has {n - 1} {thing}.")
    docs += _CODE * 3
    for country, city in _CAPITALS[:20]:
        docs.append(
            f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
            f"{IM_START}user\nWhat is the capital of {country}?{IM_END}\n"
            f"{IM_START}assistant\nThe capital of {country} is {city}.{IM_END}\n")
    for fact in _FACTS:
        docs.append(f"{IM_START}user\nTell me a fact.{IM_END}\n{IM_START}assistant\n{fact}{IM_END}\n")
    paragraphs = [p.replace("\n", " ").strip() for p in _PROSE.split("\n\n") if p.strip()]
    docs += paragraphs
    sentences = [x.strip() + "." for p in paragraphs for x in p.split(".") if x.strip()]
    docs += [f"{IM_START}user\nSay something.{IM_END}\n{IM_START}assistant\n{x}{IM_END}\n"
             for x in sentences]
    # Repeat so that frequent words and " Paris"-style pieces become whole tokens.
    return docs * 4


# --------------------------------------------------------------------------------------------
# Model name resolution
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    on = {"1", "true", "yes", "on"}
    return any(os.environ.get(k, "").strip().lower() in on for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def model_not_found(base_model: str, cause: BaseException | None = None) -> ValueError:
    """The error for a model that is neither local nor reachable on the hub."""
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return ValueError(
        f"Model {base_model!r} could not be found locally or on the Hugging Face hub{why}. "
        f"Pass a local model directory, a hub id you have cached or can download, or "
        f"{TINY_MODEL_NAME!r}, the built-in tiny model that works offline.")


def resolve_model_path(base_model: str) -> str:
    """What to pass to ``from_pretrained`` for ``base_model``.

    ``loops/tiny-qwen3`` becomes the generated directory; an existing local directory is used as
    is; anything else is a hub id, returned unchanged. With ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) set, a hub id must already be in the local cache, else ``ValueError``.
    Without it, ``from_pretrained`` may download; callers turn its failure into
    :func:`model_not_found`.
    """
    if base_model == TINY_MODEL_NAME:
        return str(tiny_model_path())
    local = Path(base_model).expanduser()
    if local.is_dir():
        return str(local)
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        try:
            hit = try_to_load_from_cache(base_model, "config.json")
        except Exception as e:  # malformed repo id, etc.
            raise model_not_found(base_model, e) from e
        if not isinstance(hit, str):
            raise model_not_found(base_model)
    return base_model
