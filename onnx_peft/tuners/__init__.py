"""PyTorch layers of each adapter method (one file per method). Importing this needs torch."""
