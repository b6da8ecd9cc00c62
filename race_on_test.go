//go:build race

package main

// raceDetector reports whether the tests run under the race detector,
// which makes memory measurements larger (its shadow memory).
const raceDetector = true
