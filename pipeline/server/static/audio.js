// Audio playback per member: a slot for the audio issue (issue 14). The viewer hands it
// every member's audio frames once the server relays them; until then it does nothing.
// Planned: WebCodecs AudioDecoder (Opus 48 kHz, available on http://127.0.0.1 and https
// pages), one AudioWorklet jitter buffer per member, played in sync with the skeleton on
// posewire's capture clock.

export class AudioSlot {
  constructor() {
    this.enabled = false;
  }

  /** An audio frame of a member (not sent by the server yet): ignored. */
  frame(_memberId, _data) {}

  stop() {}
}
