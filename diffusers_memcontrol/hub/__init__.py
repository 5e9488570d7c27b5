"""The Hub: publishing a run, downloading and loading adapters onto pipelines, adapter files."""
