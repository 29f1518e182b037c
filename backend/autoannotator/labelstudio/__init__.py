"""Every Label Studio shape and call: label configs and prediction JSON, the aa_* task fields, API
writes, the review tab. No torch.
"""
