"""A toy-size, random-weight Gemma 4 (image + text) with E4B's structure, built deterministically.

The embedded default model of the project: no hub is reachable on CI, so the project makes its own
checkpoint. It keeps what makes Gemma 4 E4B awkward for compression and serving tools: per-layer
inputs, KV-shared layers, the 5 sliding + 1 full attention pattern, two head dims, a vision tower,
Gemma 4's turn and image tokens, a chat template and an image processor.

Run in the compression environment (transformers 5.17); the files it writes also load in the
serving environment's newer transformers and vLLM (see ``_SERVE_ENV_VISION_FIELDS``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

# Gemma 4's own special tokens; ids are small here because the vocabulary is.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>",
    "<|image>", "<|image|>", "<image|>",
    "<|audio>", "<|audio|>", "<audio|>", "<|video|>",
]
NAMED_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
}

# A Gemma 4 style template: turns are <|turn>ROLE ... <turn|>, images are "\t<|image|>", and with
# thinking off the model turn is prefilled with an empty thought channel.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "<|turn>{{ role }}\n"
    "{%- if role == 'system' and enable_thinking is defined and enable_thinking %}<|think|>{% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] in ['image', 'image_url'] -%}\t<|image|>\t"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<turn|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model\n"
    "{%- if not (enable_thinking is defined and enable_thinking) -%}<|channel>thought\n<channel|>{%- endif -%}"
    "{%- endif -%}"
)

# Text the tokenizer's merges are learnt from: the words the workloads and built-in tasks use.
_CORPUS = """
What is the total on this receipt? How many red circles are there? What shape is the blue object?
Describe the image in one sentence. Answer with a single word or number. Read the date on the invoice.
The store name is printed at the top. Item price quantity subtotal tax total amount due cash change.
There are three green squares and two yellow triangles on a white background. Answer concisely.
You are a helpful assistant. Think step by step before answering. The answer is A B C D E F G H I J.
circle square triangle red green blue yellow orange purple black white gray one two three four five
six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 . , : ; ! ? $ % ( ) - / the a an of in on at to is
"""

# Random weights drawn this wide give peaked next-token distributions, so top-1 agreement with the
# baseline is a stable quality signal that compression moves (measured in transformers on this
# toy: int4 g128 round-to-nearest keeps ~93% of top-1 tokens, FP8 ~93%; at the default 0.02 the
# distributions are flat and agreement is noise, ~7%).
INIT_RANGE = 0.25
TEXT_CONFIG = dict(
    vocab_size=1024, vocab_size_per_layer_input=1024, hidden_size=128, intermediate_size=512,
    num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
    global_head_dim=128, num_kv_shared_layers=4, hidden_size_per_layer_input=128,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2, sliding_window=128,
    final_logit_softcapping=30.0, max_position_embeddings=4096, tie_word_embeddings=True,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0,
                           "partial_rotary_factor": 0.25},
    },
    pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=INIT_RANGE,
)
DEFAULT_SOFT_TOKENS = 70
# default_output_length must equal the image processor's soft-token budget: vLLM sizes the image
# placeholders from it while the processor sizes the embeddings from max_soft_tokens.
VISION_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, head_dim=32, patch_size=16, pooling_kernel_size=3,
    position_embedding_size=1024, default_output_length=DEFAULT_SOFT_TOKENS,
)
DEFAULT_SOFT_TOKENS = 70


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_CONFIG["vocab_size"], special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # Pad the vocabulary to exactly vocab_size so ids never exceed the embedding table.
    missing = TEXT_CONFIG["vocab_size"] - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<unused{i}>" for i in range(missing)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", extra_special_tokens=NAMED_TOKENS,
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out_dir: str | Path, seed: int = 0, soft_tokens: int = DEFAULT_SOFT_TOKENS) -> Path:
    """Write a complete toy checkpoint (weights, config, tokenizer, processor) into out_dir."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from search.models.gemma4 import complete_kv_shared

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in NAMED_TOKENS.items()}
    config = Gemma4Config(
        text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, audio_config=None,
        boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"], image_token_id=ids["image_token"],
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"), boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"], audio_token_id=ids["audio_token"],
        tie_word_embeddings=True, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    complete_kv_shared(out)  # what vLLM 0.26 (GPU) needs of the KV-shared layers
    save_processor(out, tokenizer, soft_tokens)
    return out


def save_processor(out: Path, tokenizer, soft_tokens: int) -> None:
    """Gemma 4's processor (image budget ``soft_tokens``, chat template) beside a checkpoint."""
    from transformers import Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(max_soft_tokens=soft_tokens),
        tokenizer=tokenizer, video_processor=Gemma4VideoProcessor(),
        chat_template=CHAT_TEMPLATE, image_seq_length=soft_tokens,
    )
    processor.save_pretrained(out)


def fingerprint(model_dir: str | Path) -> str:
    """sha256 over every file of a checkpoint (names and bytes): the model's identity in cache keys."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
