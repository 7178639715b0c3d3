"""The server's limits and knobs (`tunesmith serve` options), one frozen dataclass handed to `create_app`."""

from __future__ import annotations

import dataclasses

API_KEY_ENV = "TUNESMITH_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None  # bearer token every /v1 and /metrics request must carry; None: open
    max_batch_size: int = 32  # inputs run together: concurrent requests are grouped up to this many
    # how long the first request of a group waits for others; 0: none, a group is what queued while the model ran
    max_wait_ms: float = 0.0
    max_body_bytes: int = 1_000_000  # 413 above this
    max_items: int = 256  # inputs per request; 413 above this
    max_chars: int = 20_000  # characters per text (a message's content, a prompt, a context); 413 above this
    max_new_tokens: int = 1024  # the most a generation request may ask for; 422 above this
    max_num_beams: int = 8  # beam search width a request may ask for (memory grows with it); 422 above this
    request_timeout_s: float = 120.0  # 504 after this (the running batch still finishes in its thread)
    # The batch `predict` runs inside one group. A group of concurrent requests mixes short and long texts; predict
    # sorts them by length, so smaller batches pad less: on 32 Rotten Tomatoes reviews (MiniLM, fp32, 2 cores)
    # 64 (one batch padded to the longest) gave 153 texts/s, 16 gave 207-213.
    predict_batch_size: int = 16

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "api_key" and (value is None or value < 0 or (value == 0 and field.name != "max_wait_ms")):
                raise ValueError(f"{field.name}: expected a positive number, found {value!r}")
