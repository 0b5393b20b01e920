"""A hospital runs only the apps (FABs) it reviewed and approved: the approval list, the FAB reader, and
the ClientApp side of a deployed site that checks an app before anything of it is imported."""

from medfusion_fl.approval.approvals import ApprovalList, SiteApps, check_app
from medfusion_fl.approval.fab import FabInfo, parse_hash, read_fab

__all__ = ["ApprovalList", "FabInfo", "SiteApps", "check_app", "parse_hash", "read_fab"]
