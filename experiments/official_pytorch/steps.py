"""The official training steps: SemiMeta's meta step and update, and the supervised baseline.

Restated line for line from `train_meta.py` / `train_meta_imagenet.py` (the finite-difference
pseudo-label update in evaluation mode, then mix-up and the consistency term in training mode)
and `train_baseline.py` without `--mix-up` (labeled cross-entropy). `official_sgd` is the
optimizer all of them step. The meta step also has a sync-free variant (see
`official_pseudo_labels`), which computes the same numbers without the official code's host
synchronisations.
"""

import contextlib

import torch
import torch.nn.functional as F


def official_sgd(params, *, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-4) -> torch.optim.SGD:
  """The official optimizer: SGD with momentum, no Nesterov, coupled L2 weight decay.

  Args:
    params: the parameters to update (`model.parameters()`).
    lr: initial learning rate; the steps set each step's rate on the param groups.
    momentum: SGD momentum (0.9 officially).
    weight_decay: coupled weight decay (1e-4 officially).

  Returns:
    The `torch.optim.SGD` instance.
  """
  return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _concat(xs):
  # The official helper flattens with `view(-1)`; `reshape` is the same for the contiguous
  # gradients of eager mode and also accepts the strided ones a compiled backward may return.
  return torch.cat([x.reshape(-1) for x in xs])


def official_pseudo_labels(model, label_img, label_gt, unlabel_img, *, lr, epsilon: float,
                           amp=contextlib.nullcontext, sync_free: bool = False):
  """The meta step of `train_meta.py`: the finite-difference pseudo-label update, in evaluation mode.

  Args:
    model: the network; switched to evaluation mode, its parameters restored on return.
    label_img: labeled images.
    label_gt: their integer labels.
    unlabel_img: unlabeled images.
    lr: the learning rate, which is also the official pseudo-label step size.
    epsilon: finite-difference step relative to ||v|| (1e-2 officially).
    amp: a zero-argument context-manager factory wrapped around every forward and loss
      (`torch.autocast` for bf16; a null context for fp32).
    sync_free: keep epsilon on the device and perturb the parameters with `_foreach` ops,
      instead of the official per-parameter `add_(g, alpha=epsilon)`, which reads the 0-dim
      tensor epsilon back to the host once per parameter tensor in each of its three loops.

  Returns:
    (d, yhat): the finite-difference direction and the updated, renormalised pseudo-labels.
  """
  params = list(model.parameters())

  ### First-order approximation (the official comment), in evaluation mode ###
  model.eval()
  with amp():
    label_pred = model(label_img)
    label_loss = F.cross_entropy(label_pred, label_gt, reduction='mean')
  dtheta = torch.autograd.grad(label_loss, params, only_inputs=True)

  with torch.no_grad():
    with amp():
      # The initial pseudo-labels ytil (updated in place into yhat below, as officially).
      unlabel_pred = model(unlabel_img)
      unlabel_pseudo_gt = F.softmax(unlabel_pred, dim=1)
      epsilon = epsilon / torch.norm(_concat(dtheta))

      if sync_free:
        step = torch._foreach_mul(dtheta, epsilon)  # pylint: disable=protected-access
        data = [p.data for p in params]
        torch._foreach_add_(data, step)  # pylint: disable=protected-access
        unlabel_pred_pos = model(unlabel_img)
        torch._foreach_sub_(data, step, alpha=2.0)  # pylint: disable=protected-access
        unlabel_pred_neg = model(unlabel_img)
        torch._foreach_add_(data, step)  # pylint: disable=protected-access
      else:
        # Forward finite difference.
        for p, g in zip(params, dtheta):
          p.data.add_(g, alpha=epsilon)
        unlabel_pred_pos = model(unlabel_img)
        # Backward finite difference.
        for p, g in zip(params, dtheta):
          p.data.sub_(g, alpha=2. * epsilon)
        unlabel_pred_neg = model(unlabel_img)
        # Resume the original parameters.
        for p, g in zip(params, dtheta):
          p.data.add_(g, alpha=epsilon)

      # The finite-difference direction d, and the pseudo-label step with relu + renormalising.
      unlabel_grad = F.softmax(unlabel_pred_pos, dim=1) - F.softmax(unlabel_pred_neg, dim=1)
      unlabel_grad.div_(epsilon)
      unlabel_pseudo_gt.sub_(unlabel_grad, alpha=lr)
      torch.relu_(unlabel_pseudo_gt)
      sums = torch.sum(unlabel_pseudo_gt, dim=1, keepdim=True)
      unlabel_pseudo_gt /= torch.where(sums == 0., torch.ones_like(sums), sums)
  return unlabel_grad, unlabel_pseudo_gt


def semimeta_step(model, optimizer, batch, *, lr: float, weight: float, epsilon: float,
                  num_classes: int, beta_distribution=None, amp=contextlib.nullcontext,
                  sync_free: bool = False):
  """One SemiMeta update as `train_meta.py` / `train_meta_imagenet.py` compute it.

  Args:
    model: the network; left in training mode, its parameters and running averages updated.
    optimizer: SGD over `model.parameters()`.
    batch: {'label_img', 'label_gt', 'unlabel_img'} on the model's device, B_l = B_u.
    lr: this step's learning rate (also the pseudo-label step size, as officially).
    weight: consistency weight w(t).
    epsilon: finite-difference step relative to ||v|| (1e-2 officially).
    num_classes: number of classes of the one-hot labels.
    beta_distribution: Beta(a, a) over a 1-element parameter for mix-up, or None for the
      labeled cross-entropy instead (train_meta.py without `--mix-up`). Its device decides
      where lambda is drawn: the official code draws it on the CPU and copies it over.
    amp: a zero-argument context-manager factory wrapped around every forward and loss
      (`torch.autocast` for bf16; a null context for fp32).
    sync_free: see `official_pseudo_labels`.

  Returns:
    The total loss (a device tensor; not read back, so timing sees no extra sync).
  """
  label_img, label_gt, unlabel_img = batch['label_img'], batch['label_gt'], batch['unlabel_img']
  _label_gt = F.one_hot(label_gt, num_classes=num_classes).float()
  for param_group in optimizer.param_groups:
    param_group['lr'] = lr
  _, unlabel_pseudo_gt = official_pseudo_labels(model, label_img, label_gt, unlabel_img, lr=lr,
                                                epsilon=epsilon, amp=amp, sync_free=sync_free)

  # Training mode: the real update.
  model.train()
  with amp():
    if beta_distribution is not None:
      with torch.no_grad():
        alpha = beta_distribution.sample((label_img.shape[0],))
        alpha = alpha.to(label_img.device)  # The official `.cuda()`: a blocking copy from the CPU.
        _alpha = alpha.view(-1, 1, 1, 1)
        interp_img = (label_img * _alpha + unlabel_img * (1. - _alpha)).detach()
        interp_pseudo_gt = (_label_gt * alpha + unlabel_pseudo_gt * (1. - alpha)).detach()
      interp_pred = model(interp_img)
      supervised_loss = F.kl_div(F.log_softmax(interp_pred, dim=1), interp_pseudo_gt,
                                 reduction='batchmean')
    else:
      label_pred = model(label_img)
      supervised_loss = F.cross_entropy(label_pred, label_gt, reduction='mean')
    unlabel_pred = model(unlabel_img)
    unlabel_loss = torch.norm(F.softmax(unlabel_pred, dim=1) - unlabel_pseudo_gt, p=2,
                              dim=1).pow(2).mean()
    loss = supervised_loss + weight * unlabel_loss

  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss.detach()


def supervised_step(model, optimizer, batch, *, lr: float, amp=contextlib.nullcontext):
  """One labeled-only update as `train_baseline.py` without `--mix-up` computes it.

  Args:
    model: the network, in training mode.
    optimizer: SGD over `model.parameters()`.
    batch: {'label_img', 'label_gt', ...}; the unlabeled images are not read.
    lr: this step's learning rate.
    amp: a zero-argument context-manager factory wrapped around the forward and loss.

  Returns:
    The loss (a device tensor).
  """
  for param_group in optimizer.param_groups:
    param_group['lr'] = lr
  model.train()
  with amp():
    label_pred = model(batch['label_img'])
    loss = F.cross_entropy(label_pred, batch['label_gt'], reduction='mean')
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss.detach()
