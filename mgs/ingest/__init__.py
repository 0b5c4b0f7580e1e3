"""Scene folders from outside data: photos (sfm: pycolmap structure from motion), paper dataset
layouts and COLMAP models (datasets), transforms.json captures (transforms); orientation holds
the up-axis and GPS alignment maths they share, frames the poses and images, triangulate the
points of posed images, undistort COLMAP's undistortion to PINHOLE.

Kept empty on purpose: importing the package loads no pycolmap or image library; each module
imports what it needs (pycolmap only through mgs.pycolmap_import).
"""
