"""Values both ends of a MedFusion-FL message agree on (error codes of site replies)."""

SITE_ERROR = 4000  # the site refused on purpose: bad data, config or weights (the reason says which)
PRIVACY_DECLINED = 4001  # the round would take the site past its own privacy budget
POLICY_REFUSED = 4002  # the run asks for less protection than the site's own policy requires (reason names the key)
APP_NOT_APPROVED = 4003  # the site runs only apps (FABs) its hospital approved; the reason names the hash
