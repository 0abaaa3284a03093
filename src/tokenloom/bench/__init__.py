"""Benchmarks: an llmperf-style load generator for OpenAI-compatible servers
(``serve``), offline engine throughput (``throughput``) and side-by-side
reports (``report``). See docs/benchmarks.md."""
