"""Offline tools that write LazyMoE stores: Hugging Face conversion, demo models."""
