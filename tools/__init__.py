"""Command-line programs: synthetic data, benchmarks, PACS batch inference, MONAI Label app."""
