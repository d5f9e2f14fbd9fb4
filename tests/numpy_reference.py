"""Float64 NumPy references of the losses the methods build, for tests that check their values."""

import jax
import numpy as np


def log_softmax(logits):
  """log softmax over the last axis, in float64."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(logits):
  """softmax over the last axis, in float64."""
  return np.exp(log_softmax(logits))


def cross_entropy(logits, labels):
  """Mean over examples of -log p(label)."""
  return -np.mean(log_softmax(logits)[np.arange(len(labels)), np.asarray(labels)])


def kl(p, q):
  """Mean over examples of KL(p || q) = sum_c p (log p - log q), both given as probabilities."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return np.mean(np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0), -1))


def entropy(p):
  """Mean over examples of -sum_c p log p, in nats."""
  p = np.asarray(p, np.float64)
  return np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1))


def train_mode_logits(state, params, images):
  """The network's training-mode logits (batch statistics of `images`), as float64 numpy.

  The forward is the model's own `apply_fn`; callers turn dropout off, so the key is moot.
  """
  variables = {'params': params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  rngs = {'dropout': jax.random.key(0)}
  out = state.apply_fn(variables, images, train=True, rngs=rngs,
                       mutable=['batch_stats'] if state.batch_stats else False)
  logits = out[0] if state.batch_stats else out
  return np.asarray(logits, np.float64)


# The FixMatch family as USB (microsoft/Semi-supervised-learning) writes it: its hooks restated
# line by line in float64 NumPy, with Python loops and Counter where USB has them.


def usb_consistency_ce(logits, targets, mask):
  """USB's consistency_loss(logits, targets, 'ce', mask): (ce_loss(..., 'none') * mask).mean()."""
  log_pred = log_softmax(logits)
  targets = np.asarray(targets)
  if targets.shape == log_pred.shape:
    loss = np.sum(-targets * log_pred, axis=1)
  else:
    loss = -log_pred[np.arange(len(targets)), targets]
  return np.mean(loss * np.asarray(mask, np.float64))


def usb_gen_ulb_targets(logits, use_hard_label=True, T=1.0, apply_softmax=True):
  """USB's PseudoLabelingHook.gen_ulb_targets."""
  logits = np.asarray(logits, np.float64)
  if use_hard_label:
    return np.argmax(logits, axis=-1)
  return softmax(logits / T) if apply_softmax else logits


def usb_tsa(schedule, cur_iter, total_iter, num_classes):
  """USB's UDA.TSA."""
  import math  # pylint: disable=g-import-not-at-top
  progress = cur_iter / total_iter
  if schedule == 'none':
    return 1
  threshold = {'linear': progress, 'exp': math.exp((progress - 1) * 5),
               'log': 1 - math.exp(-progress * 5)}[schedule]
  return threshold * (1 - 1 / num_classes) + 1 / num_classes


class UsbFlexMatchHook:
  """USB's FlexMatchThresholdingHook over a pool of `ulb_dest_len` entries."""

  def __init__(self, ulb_dest_len, num_classes, thresh_warmup=True):
    self.ulb_dest_len, self.num_classes, self.thresh_warmup = ulb_dest_len, num_classes, thresh_warmup
    self.selected_label = [-1] * ulb_dest_len
    self.classwise_acc = np.zeros(num_classes)

  def update(self):
    import collections  # pylint: disable=g-import-not-at-top
    counter = collections.Counter(self.selected_label)
    if max(counter.values()) < self.ulb_dest_len:
      if self.thresh_warmup:
        for i in range(self.num_classes):
          self.classwise_acc[i] = counter[i] / max(counter.values())
      else:
        without = {k: v for k, v in counter.items() if k != -1}
        for i in range(self.num_classes):
          self.classwise_acc[i] = counter[i] / max(without.values())

  def masking(self, probs, idx_ulb, p_cutoff):
    probs = np.asarray(probs, np.float64)
    max_probs, max_idx = probs.max(-1), probs.argmax(-1)
    acc = self.classwise_acc[max_idx]
    mask = (max_probs >= p_cutoff * (acc / (2.0 - acc))).astype(np.float64)
    for row, index in enumerate(idx_ulb):  # An indexed assignment: later rows overwrite.
      if max_probs[row] >= p_cutoff:
        self.selected_label[index] = int(max_idx[row])
    self.update()
    return mask


class UsbFreeMatchHook:
  """USB's FreeMatchThresholingHook (update, then the mask)."""

  def __init__(self, num_classes, momentum=0.999, use_quantile=False, clip_thresh=False):
    self.m, self.use_quantile, self.clip_thresh = momentum, use_quantile, clip_thresh
    self.p_model = np.ones(num_classes) / num_classes
    self.label_hist = np.ones(num_classes) / num_classes
    self.time_p = self.p_model.mean()

  def masking(self, logits):
    probs = softmax(logits)
    max_probs, max_idx = probs.max(-1), probs.argmax(-1)
    level = np.quantile(max_probs, 0.8) if self.use_quantile else max_probs.mean()
    self.time_p = self.time_p * self.m + (1 - self.m) * level
    if self.clip_thresh:
      self.time_p = np.clip(self.time_p, 0.0, 0.95)
    self.p_model = self.p_model * self.m + (1 - self.m) * probs.mean(0)
    hist = np.bincount(max_idx, minlength=len(self.p_model)).astype(np.float64)
    self.label_hist = self.label_hist * self.m + (1 - self.m) * (hist / hist.sum())
    mod = self.p_model / self.p_model.max()
    return (max_probs >= self.time_p * mod[max_idx]).astype(np.float64)


def usb_freematch_entropy_loss(mask, logits_s, prob_model, label_hist):
  """USB's freematch.entropy_loss (called only when mask.sum() > 0)."""
  logits_s = np.asarray(logits_s, np.float64)[np.asarray(mask) > 0]
  prob_s = softmax(logits_s)
  hist_s = np.bincount(prob_s.argmax(-1), minlength=logits_s.shape[1]).astype(np.float64)
  hist_s = hist_s / hist_s.sum()
  with np.errstate(divide='ignore'):
    inverse = lambda x: np.where(np.isinf(1 / x), 0.0, 1 / x)
    mod_prob_model = prob_model * inverse(label_hist)
    mod_prob_model = mod_prob_model / mod_prob_model.sum()
    mod_mean_prob_s = prob_s.mean(0) * inverse(hist_s)
  mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum()
  return np.sum(mod_prob_model * np.log(mod_mean_prob_s + 1e-12))


class UsbDistAlignEMA:
  """USB's DistAlignEMAHook ('uniform' target, or 'model': the EMA of the labeled probabilities)."""

  def __init__(self, num_classes, momentum=0.999, p_target_type='uniform'):
    self.m, self.update_p_target = momentum, p_target_type == 'model'
    self.p_target = np.ones(num_classes) / num_classes
    self.p_model = None

  def dist_align(self, probs_x_ulb, probs_x_lb=None):
    if self.p_model is None:
      self.p_model = np.mean(probs_x_ulb, axis=0)
    else:
      self.p_model = self.p_model * self.m + np.mean(probs_x_ulb, axis=0) * (1 - self.m)
    if self.update_p_target:
      self.p_target = self.p_target * self.m + np.mean(probs_x_lb, axis=0) * (1 - self.m)
    aligned = probs_x_ulb * (self.p_target + 1e-6) / (self.p_model + 1e-6)
    return aligned / aligned.sum(-1, keepdims=True)


class UsbSoftMatchHook:
  """USB's SoftMatchWeightingHook (its per-class start as the code means it: 1/C and 1 per class)."""

  def __init__(self, num_classes, n_sigma=2, momentum=0.999, per_class=False):
    self.n_sigma, self.m, self.per_class, self.num_classes = n_sigma, momentum, per_class, num_classes
    shape = (num_classes,) if per_class else ()
    self.mu, self.var = np.full(shape, 1.0 / num_classes), np.ones(shape)

  def masking(self, probs):
    max_probs, max_idx = probs.max(-1), probs.argmax(-1)
    if not self.per_class:
      self.mu = self.m * self.mu + (1 - self.m) * max_probs.mean()
      self.var = self.m * self.var + (1 - self.m) * max_probs.var(ddof=1)
      mu, var = self.mu, self.var
    else:
      batch_mu, batch_var = np.zeros(self.num_classes), np.ones(self.num_classes)
      for i in range(self.num_classes):
        prob = max_probs[max_idx == i]
        if len(prob) > 1:
          batch_mu[i], batch_var[i] = prob.mean(), prob.var(ddof=1)
      self.mu = self.m * self.mu + (1 - self.m) * batch_mu
      self.var = self.m * self.var + (1 - self.m) * batch_var
      mu, var = self.mu[max_idx], self.var[max_idx]
    return np.exp(-(np.minimum(max_probs - mu, 0.0) ** 2) / (2 * var / (self.n_sigma ** 2)))
