"""The ELBO of a NumPyro model and guide with one estimator per sample site (DiCE credit).

``import scoregrad.numpyro_sites as ns``; see docs/numpyro.md. Needs numpyro. Sites in a
``numpyro.plate`` are credited per element (``ns.elbo(..., credit="element")``, the default) or
as a whole (``credit="site"``).
"""

from scoregrad._src.numpyro_sites import (
    SiteBaseline,
    SiteELBO,
    elbo,
    group_leave_one_out,
    leave_one_out,
)

__all__ = ["SiteBaseline", "SiteELBO", "elbo", "group_leave_one_out", "leave_one_out"]
