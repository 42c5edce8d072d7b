"""Autointerp settings, torch-free so the CLI derives its options from them at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LabelConfig:
    """How `label_atlas` labels and scores; each field is a `mri label` option of the same name."""

    features: str = field(
        default="live:100", metadata={"help": "ids and ranges (0-99,150) or live:N (first N that fired)"}
    )
    explainer: str = field(
        default="statistical",
        metadata={"help": "statistical (offline), openai (--endpoint) or hf[:MODEL] (in-process)"},
    )
    scorer: list[str] = field(
        default_factory=lambda: ["embedding"],
        metadata={"help": "embedding (offline), detection, fuzzing (LLM-judged), simulation (in-process model, or an "
                          "endpoint giving prompt logprobs)"},
    )  # fmt: skip
    endpoint: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible base URL, e.g. http://localhost:8000/v1"}
    )
    llm_model: str | None = field(default=None, metadata={"help": "model name the endpoint serves"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight"})
    seed: int = field(default=0, metadata={"help": "seed of the held-out split and the control labels"})
