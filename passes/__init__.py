"""Graph passes: taint (stage 3), partition (stage 4), signature (stage 5). See README.md."""
