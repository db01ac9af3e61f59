"""Media room: reading, resampling and writing video and audio (io) and face tracking (faces)."""
