"""
guided_diffusion: ADM ("Diffusion Models Beat GANs on Image Synthesis") in PyTorch.
"""
