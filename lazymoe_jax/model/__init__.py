"""Model math: pure jitted functions over parameter pytrees. No files, no flags."""
