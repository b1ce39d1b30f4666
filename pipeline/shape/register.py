"""Similarity ICP of the input femur onto the NSM mean shape (spec d.2), with VTK."""

from __future__ import annotations

import numpy as np

from pipeline.shape.mesh import TriMesh


def similarity_icp(
    source: TriMesh,
    target: TriMesh,
    *,
    max_iterations: int = 100,
    max_landmarks: int = 1000,
) -> np.ndarray:
    """4x4 similarity matrix M (p' = M [p, 1]) registering ``source`` onto ``target``.

    VTK ``vtkIterativeClosestPointTransform``: similarity landmark mode, centroids matched
    first, closest points on the target's cells, at most ``max_landmarks`` source landmarks
    (every floor(N/max)-th vertex), mean-distance check off so all iterations run - the same
    settings as pymskt ``rigidly_register(reg_mode="similarity")``.
    """
    import vtk

    icp = vtk.vtkIterativeClosestPointTransform()
    icp.SetSource(source.to_polydata())
    icp.SetTarget(target.to_polydata())
    icp.GetLandmarkTransform().SetModeToSimilarity()
    icp.SetMaximumNumberOfIterations(max_iterations)
    icp.SetMaximumNumberOfLandmarks(max_landmarks)
    icp.StartByMatchingCentroidsOn()
    icp.CheckMeanDistanceOff()
    icp.Modified()
    icp.Update()
    vm = icp.GetMatrix()
    return np.array([[vm.GetElement(i, j) for j in range(4)] for i in range(4)], dtype=np.float64)
