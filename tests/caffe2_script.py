"""A Caffe2 script of the cosine family, written against Caffe2's own Python API.

It runs as it is where Caffe2 is installed. tests/protocols/test_caffe2.py runs it against a cosserve
server with only its import lines changed (`caffe2.python` and `caffe2.proto` become
`cosserve.caffe2`), and checks every value it fetched against numpy and torch autograd.
"""

import numpy as np
from caffe2.python import core, workspace
from caffe2.proto import caffe2_pb2


def inputs():
    """The arrays the script feeds (the test recomputes everything from them)."""
    rng = np.random.RandomState(0)
    return {
        "X": rng.randn(4, 3).astype(np.float32),
        "Y": rng.randn(4, 3).astype(np.float32),
        "dS": rng.randn(4).astype(np.float32),
        "W": rng.randn(4, 6).astype(np.float32),
        "labels": np.array([1, -1, 1, 0], dtype=np.int32),
    }


def run():
    """Feed, create operators, run them, fetch; returns every fetched value by name."""
    data = inputs()
    fetched = {}
    cpu = core.DeviceOption(caffe2_pb2.CPU)

    workspace.ResetWorkspace()
    for name in ("X", "Y", "dS", "W", "labels"):
        assert workspace.FeedBlob(name, data[name]) is True

    # Forward and gradient, one operator at a time.
    workspace.RunOperatorOnce(core.CreateOperator("CosineSimilarity", ["X", "Y"], ["S"], device_option=cpu))
    workspace.RunOperatorOnce(core.CreateOperator("CosineSimilarityGradient", ["X", "Y", "dS"], ["dX", "dY"]))
    workspace.RunOperatorsOnce([
        core.CreateOperator("SquaredL2Distance", ["X", "Y"], ["L2"]),
        core.CreateOperator("SquaredL2DistanceGradient", ["X", "Y", "dS"], ["dX2", "dY2"]),
        # replicate=True travels as the int 1, as Caffe2 stores bools.
        core.CreateOperator("DotProductWithPadding", ["W", "X"], ["P"], replicate=True),
        core.CreateOperator("CosineEmbeddingCriterion", ["S", "labels"], ["loss"], margin=0.1),
    ])
    fetched.update(zip(["S", "dX", "dY"], workspace.FetchBlobs(["S", "dX", "dY"])))
    for name in ("L2", "dX2", "dY2", "P", "loss"):
        fetched[name] = workspace.FetchBlob(name)
    fetched["blobs"] = workspace.Blobs()

    # A second workspace, its own blobs, and a net run in one call.
    workspace.SwitchWorkspace("pairs", True)
    fetched["pairs_blobs_at_start"] = workspace.Blobs()
    workspace.FeedBlob("X", data["X"])
    workspace.FeedBlob("Y", data["Y"])
    net = core.Net("pair_distances")
    net.DotProduct(["X", "Y"], "dot")
    net.L1Distance(["X", "Y"], "l1")
    net.Proto().device_option.CopyFrom(cpu)
    workspace.RunNetOnce(net)
    fetched["dot"], fetched["l1"] = workspace.FetchBlobs(["dot", "l1"])
    fetched["workspaces"] = workspace.Workspaces()
    fetched["current"] = workspace.CurrentWorkspace()

    workspace.SwitchWorkspace("default")
    fetched["default_has_S"] = workspace.HasBlob("S")
    fetched["default_has_dot"] = workspace.HasBlob("dot")
    return fetched
