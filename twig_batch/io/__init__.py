"""Input datasets, output storage (local or S3), the output layout and the manifest."""
