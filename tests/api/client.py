"""A1111's own Python client (`webuiapi`, unchanged) against `sdw serve` on the tiny
test model. Usage: client.py URL FIXTURES_DIR. Exit status 0 when every check passes."""

import sys
import urllib.parse

import webuiapi
from PIL import Image, ImageChops

url, fixtures = sys.argv[1], sys.argv[2]
u = urllib.parse.urlparse(url)
api = webuiapi.WebUIApi(host=u.hostname, port=u.port, sampler="Euler a", steps=8)

PROMPT = "a photo of sks person as an astronaut, (stars:1.2)"
NEGATIVE = "blurry, lowres"


def max_diff(a, b):
    return max(hi for _, hi in ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getextrema())


models = api.get_sd_models()
assert models and models[0]["title"], models
names = [s["name"] for s in api.get_samplers()]
assert "Euler a" in names and "DPM++ 2M" in names, names

# The golden txt2img image through the client's defaults (it sends dozens of fields sdw ignores).
r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=4040056495, cfg_scale=7, width=64, height=64)
golden = Image.open(f"{fixtures}/txt2img-euler_a.png")
d = max_diff(r.image, golden)
assert d <= 2, f"txt2img differs from the golden image by {d} levels"
assert r.info["seed"] == 4040056495 and "Seed: 4040056495" in r.info["infotexts"][0], r.info
assert r.image.info["parameters"].startswith(PROMPT), r.image.info

# "DPM++ 2M Karras": the sampler name with its schedule, as older clients send it.
r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=42, cfg_scale=5.5, width=64, height=64,
                sampler_name="DPM++ 2M Karras")
d = max_diff(r.image, Image.open(f"{fixtures}/txt2img-dpmpp_2m_karras.png"))
assert d <= 2, f"DPM++ 2M Karras differs by {d} levels"

# The golden img2img image from a PIL image the client encodes itself.
init = Image.open(f"{fixtures}/img2img-init.png")
r = api.img2img(images=[init], prompt=PROMPT, negative_prompt=NEGATIVE, seed=99, cfg_scale=7, steps=10,
                denoising_strength=0.6, width=init.width, height=init.height)
d = max_diff(r.image, Image.open(f"{fixtures}/img2img-euler_a.png"))
assert d <= 2, f"img2img differs from the golden image by {d} levels"

# Inpainting with a mask: the unmasked half comes back exactly.
mask = Image.new("L", init.size, 0)
mask.paste(255, (0, 0, init.width // 2, init.height))
r = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, inpaint_full_res=False, prompt=PROMPT,
                seed=1, steps=4, denoising_strength=0.9, width=init.width, height=init.height, mask_blur=0)
right = (init.width // 2 + 8, 0, init.width, init.height)
assert max_diff(r.image.crop(right), init.crop(right)) == 0, "an unmasked pixel changed"

# Options: the whole dict posted back unchanged is accepted.
options = api.get_options()
assert options["sd_model_checkpoint"], options
api.set_options(options)

# PNG Info of an image sdw made.
info = api.png_info(r.image)
assert info.info.startswith(PROMPT), info.info
assert info.parameters["Seed"] == "1", info.parameters

print("webuiapi client: all checks passed")
