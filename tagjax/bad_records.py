"""The one rule for bad records, shared by every reader of training and evaluation data.

A reader skips what it cannot use (an undecodable image, a record without labels) and counts it, so one
bad file never ends a long run; but a run whose data is broken must not quietly train on what is left.
The rule: fail once more than ``config.data.max_bad_record_fraction`` of the records read were bad,
judged only after ``config.data.bad_record_min_reads`` reads (one early bad record is not a rate) or at the
end of a finite pass (``final``), whichever comes first. The pretraining input pipeline, the fine-tuning
batches and the image readers of evaluation, prediction and feature extraction all apply it.
"""

from __future__ import annotations

from tagjax.errors import UserError


def too_many_bad(
    bad: int, read: int, max_fraction: float, min_reads: int, final: bool = False
) -> bool:
    """Whether ``bad`` of ``read`` records break the rule (see the module docstring)."""
    return (read >= min_reads or final) and bad > max_fraction * read


class BadRecordCounter:
    """Running counts of one reader, checked against the rule at every :meth:`add`.

    ``what`` names the records in the error ("training images of emoji_subgroups"); ``cause`` says what
    made them bad and ``fix`` what to do, both appended to the one-line UserError.
    """

    def __init__(
        self,
        max_fraction: float,
        min_reads: int,
        what: str,
        cause: str = "unreadable",
        fix: str = "repair the data or raise it",
    ):
        self.max_fraction, self.min_reads = float(max_fraction), int(min_reads)
        self.what, self.cause, self.fix = what, cause, fix
        self.records_read = 0
        self.bad_records = 0

    @classmethod
    def from_data_config(cls, data_config, what: str, **kwargs) -> BadRecordCounter:
        """The counter with the run's thresholds (``config.data``)."""
        return cls(
            float(data_config.max_bad_record_fraction),
            int(data_config.bad_record_min_reads),
            what,
            **kwargs,
        )

    def add(self, read: int, bad: int, final: bool = False) -> None:
        self.records_read += int(read)
        self.bad_records += int(bad)
        self.check(final)

    def check(self, final: bool = False) -> None:
        if too_many_bad(
            self.bad_records, self.records_read, self.max_fraction, self.min_reads, final
        ):
            raise UserError(
                f"{self.bad_records} of {self.records_read} {self.what} were bad ({self.cause}), more "
                f"than config.data.max_bad_record_fraction={self.max_fraction}; {self.fix}."
            )
