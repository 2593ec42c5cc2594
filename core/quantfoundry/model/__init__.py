"""The source model: resolving a folder or hub id, reading its weights block by block,
materializing parts of a meta-device skeleton, capturing the first block's inputs."""
