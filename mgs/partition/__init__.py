"""`mgs partition`: a grid of cells in contracted space, cameras assigned to blocks.

`build` partitions a scene and reads partition.json back; `geometry` is the contraction and the
grid, `assign` the camera-to-block assignment, `plot` partition.png.
"""

from mgs.partition.build import Block, Partition, PartitionConfig, load_partition, partition_scene

__all__ = ["Block", "Partition", "PartitionConfig", "load_partition", "partition_scene"]
