"""Fast sampling mode: trades the bit-exact images of the default (exact) mode for speed.

Exact mode runs the networks as they are and gives the reference's images bit for bit; it is
`FastSettings()` (everything off), and `prepare(net, FastSettings())` returns `net` itself, with
TF32 turned off for matmuls and convolutions alike (PyTorch leaves TF32 convolutions on unless
told). Fast mode switches on, each separately:

- batch_guidance: classifier-free guidance's conditional and unconditional passes as one forward
  of twice the batch (`batched_passes`, which `training.sampling.guided_denoise` calls for
  networks prepared here; a separate guide network of autoguidance is a second call);
- precision: the U-Net under `torch.autocast` in fp16 (default) or bf16 ('fp32' = no autocast).
  The preconditioning around it (c_in, c_skip, c_out) stays float32 and the sampler float64;
  a network's own `use_fp16` is switched off in the fast copy, so autocast alone decides.
  fp16 is the default: on tiny test networks its images are ~8x closer to exact ones than
  bf16's (10 vs 7 mantissa bits) at the same tensor-core speed, and the paper's ImageNet
  networks were trained and sampled in fp16. A non-finite fp16 output (overflow) raises
  FloatingPointError naming bf16 as the fix;
- tf32: TF32 matmuls and convolutions during network calls (CUDA, Ampere and newer); with it
  off (--no-tf32) both are explicitly off, as in exact mode;
- channels_last: the U-Net's input in channels-last memory layout (faster convolutions on
  tensor cores; a no-op for the values);
- compile: `torch.compile` of the U-Net; when compiling fails (no compiler, unsupported
  platform) a warning is given once and the network runs eagerly.

The network is never modified: `prepare` returns a wrapper around a shallow copy that shares the
parameters and differs only in the wrapped U-Net. bf16 training (and its sample grids) uses the
same wrapper, so that only the U-Net runs under autocast.
"""

import contextlib
import dataclasses
import warnings

import torch

import dnnlib

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

#----------------------------------------------------------------------------
# Settings.

@dataclasses.dataclass(frozen=True)
class FastSettings:
    batch_guidance: bool = False
    precision: str = 'fp32'            # 'fp32' | 'bf16' | 'fp16'
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = 'inductor'  # torch.compile backend ('eager' only traces: for tests)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise dnnlib.UserError(f'--precision must be one of {", ".join(PRECISIONS)}, got "{self.precision}"')

    @property
    def exact(self):
        return not (self.batch_guidance or self.precision != 'fp32' or self.tf32 or self.channels_last or self.compile)

    def describe(self):
        on = [name for name, value in [('batched-guidance', self.batch_guidance), ('tf32', self.tf32),
                                       ('channels-last', self.channels_last), ('compile', self.compile)] if value]
        return 'exact' if self.exact else f'fast ({", ".join([self.precision, *on])})'


EXACT = FastSettings()


def settings_from_options(fast=False, precision=None, tf32=None, channels_last=False, compile=False):
    """FastSettings from command-line style options; None = the default of the mode.

    Without `fast` every option that would change the images is refused (UserError naming the
    option), so that exact mode cannot be left by accident. With `fast`: batched guidance, fp16,
    TF32 on; channels-last and compile off unless asked for.
    """
    if not fast:
        given = [name for name, value in [('--precision', precision is not None), ('--tf32', tf32),  # Not --no-tf32: exact's own.
                                          ('--channels-last', channels_last), ('--compile', compile)] if value]
        if given:
            raise dnnlib.UserError(f'{given[0]} needs --fast (the default exact mode runs the networks unchanged)')
        return EXACT
    return FastSettings(batch_guidance=True, precision='fp16' if precision is None else precision, tf32=(True if tf32 is None else bool(tf32)),
                        channels_last=bool(channels_last), compile=bool(compile))

#----------------------------------------------------------------------------
# The wrapped U-Net: autocast, memory layout, optional compilation.

class _Autocast(torch.nn.Module):
    """Runs `module` under autocast (and channels-last input), the output back in the input's
    dtype; with settings.compile through torch.compile, falling back to the eager call (with one
    warning) when compilation fails."""

    def __init__(self, module, settings):
        super().__init__()
        self.module, self.settings, self.failed = module, settings, False
        object.__setattr__(self, 'compiled', None)  # Kept out of the module tree.

    def run(self, x, *args, **kwargs):
        dtype, autocast_dtype = x.dtype, PRECISIONS[self.settings.precision]
        if self.settings.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            y = self.module(x, *args, **kwargs)
        return y.to(dtype).contiguous() if torch.is_tensor(y) else y

    def forward(self, *args, **kwargs):
        if self.settings.compile and not self.failed:
            try:
                if self.compiled is None:
                    object.__setattr__(self, 'compiled', torch.compile(self.run, backend=self.settings.compile_backend))
                return self.compiled(*args, **kwargs)
            except Exception as err:  # pylint: disable=broad-exception-caught
                # Anything from dynamo/inductor (missing compiler, unsupported op or platform).
                # A genuine error of the network itself is raised again by the eager call below.
                self.failed = True
                reason = ' '.join(str(err).split())[:300]
                warnings.warn(f'torch.compile failed ({type(err).__name__}: {reason}); running the network without compilation',
                              RuntimeWarning, stacklevel=2)
        return self.run(*args, **kwargs)


@contextlib.contextmanager
def tf32_enabled(enabled):
    """TF32 matmuls and cuDNN convolutions both on or both off for the block (PyTorch's defaults
    differ: matmuls off, convolutions on), the previous flags restored on exit."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FastNetwork(torch.nn.Module):
    """A denoiser network `net` run in fast mode; every other attribute is `net`'s own.

    When `net` wraps a U-Net in `net.model` (the *Precond classes), only that U-Net is under
    autocast/compile; otherwise the whole network is.
    """

    def __init__(self, net, settings):
        super().__init__()
        object.__setattr__(self, 'original', net)  # Not a submodule: parameters are listed once.
        self.settings, self.batch_guidance = settings, settings.batch_guidance
        inner = net._modules.get('model') if isinstance(net, torch.nn.Module) else None
        # With a U-Net, a shallow copy of `net` runs: same class and attributes, its own table of
        # submodules (the U-Net wrapped); parameters and buffers are shared.
        self.runner = _Autocast(net, settings) if inner is None else object.__new__(type(net))
        if inner is not None:  # use_fp16 off: the U-Net gets float32 input, autocast decides (a no-op where not a *Precond).
            wrapped = dict(net._modules, model=_Autocast(inner, settings))
            self.runner.__dict__.update(net.__dict__, use_fp16=False, _modules=wrapped)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__['original'], name)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        with tf32_enabled(self.settings.tf32):
            out = self.runner(x, sigma, class_labels, **kwargs)
        if self.settings.precision == 'fp16' and not bool(torch.isfinite(out).all()):
            raise FloatingPointError('the network overflowed under fp16 autocast (non-finite output); '
                                     'use --precision=bf16 (same speed, wider range) or drop --fast')
        return out


def prepare(net, settings):
    """`net` itself in exact mode, else a FastNetwork sharing its parameters (None stays None).
    Exact mode turns TF32 off for the process, convolutions included: the networks run in full float32."""
    if settings is None or settings.exact:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        return net
    return FastNetwork(net, settings) if net is not None else None

#----------------------------------------------------------------------------
# Guidance.

def batched_passes(net, x, sigma, class_labels):
    """Classifier-free guidance's conditional and unconditional outputs of `net` from one forward
    of 2N images (`training.sampling.guided_denoise` mixes them). The unconditional half gets
    all-zero labels, which is what the network does with `class_labels=None`; without labels both
    passes are the same call, made once."""
    if class_labels is None:
        out = net(x, sigma, None)
        return out, out
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.numel() > 1:
        sigma = sigma.reshape(-1).repeat(2)
    return net(torch.cat([x, x]), sigma, torch.cat([class_labels, torch.zeros_like(class_labels)])).chunk(2)

#----------------------------------------------------------------------------
