"""KV caches: pytrees plus pure functions (init / update / attend)."""
