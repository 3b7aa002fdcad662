"""Content-addressed storage: CIDs byte-identical to Kubo's `ipfs add`, the blob
store interface and its backends (embedded local store, Kubo RPC), dataset,
checkpoint and update manifests, and safetensors (de)serialisation of tensors.
"""
