"""Weight tiers (device, host, NVMe), tier files, async reads, prefetch and the expert cache."""
