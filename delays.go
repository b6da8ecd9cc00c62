package main

import (
	"sync/atomic"
)

// retryDelayBounds are the upper bounds, in seconds, of the buckets of the
// retry-delay histogram: from the minimum delay's usual values to the
// resend window's.
var retryDelayBounds = [...]uint32{60, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 43200}

// A delayHistogram counts the delays from a triplet's first attempt to the
// retry that passed: what greylisting costs the mail that gets through. It
// is safe for concurrent use and allocates nothing.
type delayHistogram struct {
	buckets [len(retryDelayBounds) + 1]atomic.Uint64 // the last: above every bound
	sum     atomic.Uint64                            // seconds
}

// observe counts one pass after seconds.
func (h *delayHistogram) observe(seconds uint32) {
	i := 0
	for i < len(retryDelayBounds) && seconds > retryDelayBounds[i] {
		i++
	}
	h.buckets[i].Add(1)
	h.sum.Add(uint64(seconds))
}

// snapshot returns the cumulative count of each bucket (as Prometheus
// counts them), the total count and the sum.
func (h *delayHistogram) snapshot() (cumulative map[float64]uint64, count uint64, sum float64) {
	cumulative = make(map[float64]uint64, len(retryDelayBounds))
	for i, b := range retryDelayBounds {
		count += h.buckets[i].Load()
		cumulative[float64(b)] = count
	}
	count += h.buckets[len(retryDelayBounds)].Load()
	return cumulative, count, float64(h.sum.Load())
}
