"""ENet (Paszke et al. 2016) as a Gluon HybridBlock that exports to a plain MXNet symbol.

Only built-in operators are used, so the exported graph loads without this package:
max-unpooling is rebuilt from `Pooling`, `UpSampling` and `broadcast_equal`, and spatial
dropout is `Dropout(axes=(2, 3))`.
"""

from mxnet.gluon import nn
from mxnet.gluon.block import HybridBlock

CLASSES = 4


def conv_bn_prelu(channels, kernel, stride=1, padding=0, dilation=1):
    """Conv (no bias) -> BatchNorm -> PReLU, the unit every ENet branch is made of."""
    block = nn.HybridSequential()
    block.add(
        nn.Conv2D(channels, kernel, stride, padding, dilation, use_bias=False),
        nn.BatchNorm(),
        nn.PReLU(),
    )
    return block


class InitialBlock(HybridBlock):
    """3x3 stride-2 conv beside a 2x2 max-pool of the input, concatenated to 16 channels."""

    def __init__(self, in_channels=1, channels=16):
        super().__init__()
        self.conv = nn.Conv2D(channels - in_channels, 3, 2, 1, use_bias=False)
        self.bn = nn.BatchNorm()
        self.act = nn.PReLU()

    def hybrid_forward(self, F, x):
        pooled = F.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max")
        return self.act(self.bn(F.concat(self.conv(x), pooled, dim=1)))


class Bottleneck(HybridBlock):
    """Regular, dilated or asymmetric bottleneck with a residual connection."""

    def __init__(self, channels, kind="regular", dilation=1, dropout=0.1):
        super().__init__()
        inner = channels // 4
        self.reduce = conv_bn_prelu(inner, 1)
        if kind == "asymmetric":
            self.main = nn.HybridSequential()
            self.main.add(
                nn.Conv2D(inner, (5, 1), padding=(2, 0), use_bias=False),
                conv_bn_prelu(inner, (1, 5), padding=(0, 2)),
            )
        else:
            self.main = conv_bn_prelu(inner, 3, padding=dilation, dilation=dilation)
        self.expand = nn.HybridSequential()
        self.expand.add(nn.Conv2D(channels, 1, use_bias=False), nn.BatchNorm())
        self.dropout = dropout
        self.out_act = nn.PReLU()

    def hybrid_forward(self, F, x):
        branch = self.expand(self.main(self.reduce(x)))
        branch = F.Dropout(branch, p=self.dropout, axes=(2, 3))
        return self.out_act(x + branch)


class DownBottleneck(HybridBlock):
    """Halves the resolution; the skip path max-pools and zero-pads the channels."""

    def __init__(self, in_channels, channels, dropout):
        super().__init__()
        self.pad_channels = channels - in_channels
        self.reduce = conv_bn_prelu(channels // 4, 2, stride=2)
        self.main = conv_bn_prelu(channels // 4, 3, padding=1)
        self.expand = nn.HybridSequential()
        self.expand.add(nn.Conv2D(channels, 1, use_bias=False), nn.BatchNorm())
        self.dropout = dropout
        self.out_act = nn.PReLU()

    def hybrid_forward(self, F, x):
        pooled = F.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max")
        # zero channels via a zero-weighted slice keeps the graph shape-agnostic
        zeros = F.zeros_like(F.slice_axis(pooled, axis=1, begin=0, end=1))
        skip = F.concat(pooled, *([zeros] * self.pad_channels), dim=1)
        branch = self.expand(self.main(self.reduce(x)))
        branch = F.Dropout(branch, p=self.dropout, axes=(2, 3))
        return self.out_act(skip + branch), x, pooled


class UpBottleneck(HybridBlock):
    """Doubles the resolution; the skip path max-unpools with the encoder's pooling switches."""

    def __init__(self, channels):
        super().__init__()
        self.skip_conv = nn.HybridSequential()
        self.skip_conv.add(nn.Conv2D(channels, 1, use_bias=False), nn.BatchNorm())
        self.reduce = conv_bn_prelu(channels // 4, 1)
        self.up = nn.HybridSequential()
        self.up.add(
            nn.Conv2DTranspose(channels // 4, 3, 2, 1, output_padding=1, use_bias=False),
            nn.BatchNorm(),
            nn.PReLU(),
        )
        self.expand = nn.HybridSequential()
        self.expand.add(nn.Conv2D(channels, 1, use_bias=False), nn.BatchNorm())
        self.out_act = nn.PReLU()

    def hybrid_forward(self, F, x, encoder_input, encoder_pooled):
        # Max-unpooling: a pixel keeps the value where it was the max of its 2x2 window.
        switches = F.broadcast_equal(
            encoder_input, F.UpSampling(encoder_pooled, scale=2, sample_type="nearest")
        )
        skip = F.UpSampling(self.skip_conv(x), scale=2, sample_type="nearest") * switches
        branch = self.expand(self.up(self.reduce(x)))
        return self.out_act(skip + branch)


class ENet(HybridBlock):
    """ENet for (N, in_channels, H, W) float32 slices -> (N, classes, H, W) softmax probabilities.

    H and W must be multiples of `size_multiple`: the encoder halves them three times.
    """

    size_multiple = 8

    def __init__(self, classes=CLASSES, in_channels=1):
        super().__init__()
        self.in_channels = in_channels
        self.initial = InitialBlock(in_channels)
        self.down1 = DownBottleneck(16, 64, 0.01)
        self.stage1 = nn.HybridSequential()
        for _ in range(4):
            self.stage1.add(Bottleneck(64, dropout=0.01))
        self.down2 = DownBottleneck(64, 128, 0.1)
        self.stage23 = nn.HybridSequential()
        for _ in range(2):
            for kind, dilation in (
                ("regular", 1),
                ("dilated", 2),
                ("asymmetric", 1),
                ("dilated", 4),
                ("regular", 1),
                ("dilated", 8),
                ("asymmetric", 1),
                ("dilated", 16),
            ):
                self.stage23.add(Bottleneck(128, kind, dilation, 0.1))
        self.up4 = UpBottleneck(64)
        self.stage4 = nn.HybridSequential()
        for _ in range(2):
            self.stage4.add(Bottleneck(64, dropout=0.1))
        self.up5 = UpBottleneck(16)
        self.stage5 = Bottleneck(16, dropout=0.1)
        self.full_conv = nn.Conv2DTranspose(classes, 2, 2)

    def hybrid_forward(self, F, x):
        x = self.initial(x)
        x, enc1_in, enc1_pooled = self.down1(x)
        x = self.stage1(x)
        x, enc2_in, enc2_pooled = self.down2(x)
        x = self.stage23(x)
        x = self.stage4(self.up4(x, enc2_in, enc2_pooled))
        x = self.stage5(self.up5(x, enc1_in, enc1_pooled))
        return F.softmax(self.full_conv(x), axis=1)
