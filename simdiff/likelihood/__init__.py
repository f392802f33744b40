"""Likelihoods of diffusion models: the VDM variational bound and the exact probability-flow ODE likelihood.

* :func:`elbo` / :func:`elbo_bpd`: the continuous-time ELBO of Kingma et al. 2021 (VDM) with the discrete decoder
  for 8-bit data, estimated with stratified or antithetic log-SNR draws and importance sampling in log-SNR.
* :func:`ode_likelihood` / :func:`ode_bpd`: the probability-flow ODE log-likelihood (Song et al. 2021) with
  Hutchinson's trace estimator (Rademacher probes) or the exact trace, fixed-step RK4 or adaptive RK45.

Both return a :class:`LikelihoodResult` of per-example negative log-likelihoods in nats with Monte-Carlo errors;
``.bpd`` and ``.summary()`` give bits per dimension. Data are images in ``[-1, 1]``, 8-bit values
``k / 127.5 - 1`` (256 values, bins of width ``2/255``).
"""

from simdiff.likelihood.common import LikelihoodResult, mixture_log_prob
from simdiff.likelihood.elbo import LogSNRProposal, elbo, elbo_bpd, fit_proposal
from simdiff.likelihood.ode import ode_bpd, ode_likelihood

__all__ = ["LikelihoodResult", "LogSNRProposal", "elbo", "elbo_bpd", "fit_proposal", "mixture_log_prob",
           "ode_bpd", "ode_likelihood"]
