// interface: group_norm 3 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// GroupNorm (+ SiLU): y = (x - mean) / sqrt(var + eps) * gamma[c] + beta[c], then
// optionally y * sigmoid(y). Replaces burn's group_norm (mean, var, affine) followed by
// silu: one kernel, one read of statistics per group instead of several passes of
// separate kernels.
// Or, told to (`maps`), the normalization as one affine map per (batch item, channel) instead
// of y: a = gamma[c] / sqrt(var + eps) and s = beta[c] - mean a, as f32 pairs (a, s) into
// `affine` ([B, C, 2]; y is not written). A kernel that reads x through them
// (winograd_input.wgsl) then normalizes as it reads, and y is never stored. The pairs are
// f32: in f16, s would lose several roundings where the mean is large against the spread.
//
// One workgroup per (batch item, group); its threads stride over the group's
// channels x pixels (contiguous in NCHW). Mean first, then the variance of (x - mean):
// the two-pass form keeps fp32 accuracy when the mean is large.
//
// Template values: {{ elem }} (f32 or f16), {{ workgroup }} (threads, a power of two),
// {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> x: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> gamma: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> beta: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> y: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> affine: array<f32>;
// channels, pixels per channel, groups, apply SiLU (0/1), bits of eps as f32, maps (0/1)
@group(0) @binding(5) var<uniform> info: array<vec4<u32>, 2>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;
var<workgroup> partial: array<f32, WORKGROUP>;

// The sum of every thread's `value`, returned to all threads.
fn workgroup_sum(local: u32, value: f32) -> f32 {
    partial[local] = value;
    workgroupBarrier();
    for (var stride = WORKGROUP / 2u; stride > 0u; stride = stride / 2u) {
        if (local < stride) {
            partial[local] = partial[local] + partial[local + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    // Nobody may overwrite `partial` for the next sum before everyone has read this one.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size({{ workgroup }}, 1, 1)
fn main(@builtin(workgroup_id) group_id: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    let channels = word(0);
    let pixels = word(1);
    let groups = word(2);
    let per_group = channels / groups;
    let count = per_group * pixels;
    let item = group_id.x / groups;
    let group = group_id.x % groups;
    let base = (item * channels + group * per_group) * pixels;

    var sum = 0.0;
    for (var i = local; i < count; i = i + WORKGROUP) {
        sum = sum + f32(x[base + i]);
    }
    let mean = workgroup_sum(local, sum) / f32(count);

    var squares = 0.0;
    for (var i = local; i < count; i = i + WORKGROUP) {
        let d = f32(x[base + i]) - mean;
        squares = squares + d * d;
    }
    let variance = workgroup_sum(local, squares) / f32(count);
    let inv_std = inverseSqrt(variance + bitcast<f32>(word(4)));

    if (word(5) != 0u) {
        for (var i = local; i < per_group; i = i + WORKGROUP) {
            let c = group * per_group + i;
            let a = inv_std * f32(gamma[c]);
            let at = 2u * (item * channels + c);
            affine[at] = a;
            affine[at + 1u] = f32(beta[c]) - mean * a;
        }
        return;
    }

    for (var i = local; i < count; i = i + WORKGROUP) {
        let c = group * per_group + i / pixels;
        var v = (f32(x[base + i]) - mean) * inv_std * f32(gamma[c]) + f32(beta[c]);
        if (word(3) != 0u) {
            v = v / (1.0 + exp(-v));
        }
        y[base + i] = {{ elem }}(v);
    }
}
