"""A trial's names: its engine run's name in TensorBoard, from its searched parameters."""
from __future__ import annotations

from orchestrate.trial import tensorboard_run_name


def test_tensorboard_run_name_is_short_readable_and_path_safe():
    assert tensorboard_run_name({"optim.warmup": "linear", "optim.lr": 0.0031234, "optim.warmup_epochs": None,
                                 "optim.weight_decay": 1e-4}) == "lr=0.00312,warmup=linear,weight_decay=0.0001"
    # Keys that end alike keep their whole name; a bool, an int and a string with a slash and spaces.
    assert tensorboard_run_name({"model.graph.dropout": 0.1, "model.dropout": 0.25, "train.sync_bn": True,
                                 "data.batch_size": 16, "model.backbone": "dark/net 53"}) == \
        "batch_size=16,backbone=dark_net_53,model.dropout=0.25,model.graph.dropout=0.1,sync_bn=True"
    long = tensorboard_run_name({f"optim.p{i:02d}": 0.123456 for i in range(30)})
    assert len(long) == 120 and long.startswith("p00=0.123,p01=0.123,")
