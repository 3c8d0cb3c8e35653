// Tries every way out of the sandbox it can name: each must be missing.
function decodeUplink(input) {
  var reach = [typeof require, typeof fetch, typeof process, typeof XMLHttpRequest,
               typeof setTimeout, typeof Deno, typeof Bun];
  return { data: { reach: reach } };
}
