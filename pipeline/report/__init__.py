"""Per-scan diagnostic reports (paper Figure 2): heat maps, HTML/PNG rendering, batch index."""
