// interface: softmax 2 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// Softmax over the last dimension of a contiguous [rows, n] tensor, in place:
// s[r, j] = exp(s[r, j] - max_j s[r, j]) / sum_j exp(s[r, j] - max_j s[r, j]), the
// attention scores' softmax. Replaces burn's max, subtract, exp, sum and divide: one kernel
// instead of five, and one read and one write of the scores instead of eight passes.
//
// Each row is taken by a team of `team` threads (a power of two, at least 32, about a
// quarter of the row: CLIP's 77 keys need no 256 threads); a workgroup holds
// WORKGROUP / team rows. Three passes over the row, which stays in the cache: its max, the
// sum of the exponentials, the output. f32 arithmetic for f16 too.
//
// Template values: {{ elem }} (f32 or f16), {{ workgroup }} (threads, a power of two),
// {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> s: array<{{ elem }}>;
// rows, n, team
@group(0) @binding(1) var<uniform> info: array<vec4<u32>, 1>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;
const LOWEST: f32 = -3.40282347e+38;
var<workgroup> partial: array<f32, WORKGROUP>;

// The max (`is_max`) or the sum of `value` over each team, returned to the team's threads.
// The loop runs over every stride of the workgroup so that each barrier is reached by all
// threads; strides of the team's size and above do nothing.
fn team_reduce(local: u32, team: u32, value: f32, is_max: bool) -> f32 {
    partial[local] = value;
    workgroupBarrier();
    for (var stride = WORKGROUP / 2u; stride > 0u; stride = stride / 2u) {
        if (stride < team && local % team < stride) {
            let other = partial[local + stride];
            partial[local] = select(partial[local] + other, max(partial[local], other), is_max);
        }
        workgroupBarrier();
    }
    let total = partial[local - local % team];
    // Nobody may overwrite `partial` for the next reduction before everyone has read this one.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size({{ workgroup }}, 1, 1)
fn main(
    @builtin(workgroup_id) group_id: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) local: u32,
) {
    let rows = word(0);
    let n = word(1);
    let team = word(2);
    // Workgroups beyond 65535 spill over into y.
    let row = (group_id.x + group_id.y * groups.x) * (WORKGROUP / team) + local / team;
    let lane = local % team;
    // A team past the last row takes part in the reductions with an empty row.
    let width = select(0u, n, row < rows);
    let base = row * n;

    var top = LOWEST;
    for (var j = lane; j < width; j = j + team) {
        top = max(top, f32(s[base + j]));
    }
    top = team_reduce(local, team, top, true);

    var sum = 0.0;
    for (var j = lane; j < width; j = j + team) {
        sum = sum + exp(f32(s[base + j]) - top);
    }
    sum = team_reduce(local, team, sum, false);

    for (var j = lane; j < width; j = j + team) {
        s[base + j] = {{ elem }}(exp(f32(s[base + j]) - top) / sum);
    }
}
