"""Model files and networks: manifests, safetensors members, the U-Net, the nuclei FCN, ensembles, BatchNorm folding,
nnU-Net v2 imports, tile features for the domain guard, OpenVINO members."""
