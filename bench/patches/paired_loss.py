"""Experiment: OTMF's loss as the mean squared distance between the student's and the teacher's features of the same
inputs (the pairs are known: both come from the same batch indices), instead of the Sinkhorn divergence between the
two feature clouds, which ignores which input each feature belongs to."""

import engine.methods.otmf as otmf


def paired_distance(x, y, reg):  # noqa: ARG001 - same signature as sinkhorn_divergence
    return (x.float() - y.float()).pow(2).sum(1).mean()


otmf.sinkhorn_divergence = paired_distance
