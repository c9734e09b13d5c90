"""Demo: train a tiny GPT with AdamMini and AdamW and compare them."""
