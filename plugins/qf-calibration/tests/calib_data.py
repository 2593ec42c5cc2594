"""Paths the calibration tests share: the chat samples cut from ../shared/data
(benchmarks/make_chat_samples.py) and a ChatML template for tokenizers without one."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CHATS = ROOT / "benchmarks" / "data" / "chat" / "chat-calib.jsonl"
CHATML = Path(__file__).resolve().parent / "data" / "chatml.jinja"
