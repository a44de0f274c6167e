// async-logging viewer: how times and durations are written. Pure functions, loaded before
// app.js (and called by the browser test); no DOM, no state.
"use strict";

// eslint-disable-next-line no-unused-vars
const ViewerFormat = (function () {
  function pad(n, w) {
    return String(n).padStart(w || 2, "0");
  }

  // A duration in ms. Records may carry fractions (µs precision): below 1 ms it is written
  // in µs ("340 µs"), up to a second in ms to a tenth, then in s and min.
  function duration(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "";
    if (ms > 0 && ms < 1) {
      const us = Math.round(ms * 1000);
      return us < 1000 ? us + " µs" : "1 ms";
    }
    if (ms < 1000) return (Math.round(ms * 10) / 10) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(2) + " s";
    return (ms / 60000).toFixed(1) + " min";
  }

  // A timestamp (ms since the epoch) as a local date with milliseconds:
  // "2026-12-03 10:15:42.123".
  function time(ts) {
    if (typeof ts !== "number" || !Number.isFinite(ts)) return "";
    const d = new Date(Math.floor(ts));
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  // ms since the epoch as a datetime-local input's value (local time, to the second).
  function inputTime(ms) {
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  return Object.freeze({ duration, time, inputTime });
})();
