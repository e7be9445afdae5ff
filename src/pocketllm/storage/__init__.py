"""File storage (local directory or S3 bucket), signed file URLs and the route that serves stored files."""
